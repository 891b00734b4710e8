"""Train the domain network that defines skdcgn's FID/KID feature space (run once; the result
ships in src/skdcgn/metrics/assets/domain_net/). After training, paste the printed sha256 values
into `SHIPPED_SHA256` in src/skdcgn/metrics/domain.py.

    python benchmarks/train_domain_net.py [--out DIR] [--epochs 2] [--seed 0]
"""
from __future__ import annotations

import argparse
import dataclasses

from skdcgn.metrics.domain import ASSET_DIR, DomainTrainConfig, train_domain_net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ASSET_DIR))
    for f in dataclasses.fields(DomainTrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = p.parse_args()
    cfg = DomainTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DomainTrainConfig)})
    train_domain_net(cfg, args.out)


if __name__ == "__main__":
    main()
