"""The stacked classifier step through torch.compile (skdcgn.multitrain, `compile="on"`): the eager
stack's maths, one compilation per stack shape however often the stack is rebuilt, a bitwise resume,
a warned fallback to eager, and the setting checked.

On this CPU (Inductor, C++) each of the two graphs compiled here takes ~25 s when Inductor's cache
is cold and ~4 s when it is warm; everything else in the module runs in a few seconds."""
from __future__ import annotations

import dataclasses
import json
import logging
import types

import pytest
import torch
from torch._dynamo.utils import counters

from skdcgn import multitrain
from skdcgn.errors import SkdcgnError
from skdcgn.invariance import ClassifierConfig
from skdcgn.multitrain import ClassifierJob, train_classifiers

from test_invariance import separable_set


def _jobs(root, name: str) -> list[ClassifierJob]:
    """Three jobs, K = 3, batch 8: two share one images tensor (5 steps/epoch, 2 epochs); the third
    trains 3 epochs of 3 steps on a 20-image subset (a padded short last batch). Their epochs end at
    different steps, so the stack is rebuilt 5 times."""
    a, b = separable_set(40), separable_set(30, seed=3)
    configs = [ClassifierConfig(epochs=2, batch_size=8, seed=0, device="cpu"),
               ClassifierConfig(epochs=2, batch_size=8, seed=1, device="cpu"),
               ClassifierConfig(epochs=3, batch_size=8, seed=2, device="cpu", max_examples=20)]
    return [ClassifierJob(*data, config, root / f"{name}{i}") for i, (data, config) in enumerate(zip([a, a, b], configs))]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]  # graphs torch._dynamo compiled in this process


def _manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The jobs trained with the compiled step, and how many graphs that compiled."""
    root = tmp_path_factory.mktemp("compiled")
    torch._dynamo.reset()  # a cold start: graphs counted from here
    before = _graphs()
    jobs = _jobs(root, "c")
    models = train_classifiers(jobs, progress=False, compile="on")
    if _graphs() == before:
        pytest.skip("torch.compile is unavailable here (the stack fell back to eager)")
    return jobs, models, _graphs() - before


def test_the_compiled_stack_trains_what_the_eager_stack_trains_compiled_once(compiled, tmp_path):
    jobs, models, graphs = compiled
    assert graphs == 1  # one compilation, although the stack was rebuilt at every epoch end
    eager_jobs = _jobs(tmp_path, "e")
    eager = train_classifiers(eager_jobs, progress=False, compile="off")
    for i, (model, other) in enumerate(zip(models, eager)):
        for (name, v), w in zip(model.state_dict().items(), other.state_dict().values()):
            if v.is_floating_point():  # measured: max |Δw| 1.8e-3 after 10 steps (Adadelta at lr 1.0 amplifies
                torch.testing.assert_close(v, w, atol=5e-3, rtol=1e-2, msg=f"job {i} {name}")  # rounding)
            else:
                assert torch.equal(v, w), name
        got, want = _manifest(jobs[i].out_dir), _manifest(eager_jobs[i].out_dir)
        assert got["config"] == want["config"]  # the same stage: compile is not part of it
        for r, s in zip(got["log"], want["log"], strict=True):
            assert (r["epoch"], r["steps"], r["lr"]) == (s["epoch"], s["steps"], s["lr"])
            assert r["loss"] == pytest.approx(s["loss"], abs=1e-3)
            assert r["accuracy"] == pytest.approx(s["accuracy"], abs=0.05)  # 2 of 40 images


def test_an_interrupted_compiled_run_resumes_bitwise_without_compiling_again(compiled, tmp_path):
    """Killed at job 0's first epoch end (the others mid-epoch), resumed with compile on: each job ends
    bitwise equal to the uninterrupted compiled run (fixed slots: the same graph for every step), and
    neither call compiles a new graph (new stacks, new data tensors, the same shapes)."""
    jobs, models, _ = compiled
    before = _graphs()

    def stop(index, epoch, row):
        if (index, epoch) == (0, 1):
            raise KeyboardInterrupt

    resumed_jobs = _jobs(tmp_path, "r")
    with pytest.raises(KeyboardInterrupt):
        train_classifiers(resumed_jobs, progress=False, on_epoch_end=stop, compile="on")
    assert not (resumed_jobs[0].out_dir / "manifest.json").exists()
    resumed = train_classifiers(resumed_jobs, progress=False, compile="on")
    for i, (model, again) in enumerate(zip(models, resumed)):
        for (name, v), w in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(v, w), f"job {i} {name}"
        logs = [[{**r, "seconds": 0} for r in _manifest(j.out_dir)["log"]] for j in (jobs[i], resumed_jobs[i])]
        assert logs[0] == logs[1]
    assert _graphs() == before


def test_the_compiled_step_computes_the_eager_maths_in_float64():
    """A float64 stack (K = 2, per-job learning rates, a padded batch), stepped eagerly and compiled,
    rebuilt midway as at an epoch end: equal to 1e-12 (measured 1e-16; in float32 the same steps
    differ by up to 2e-4, rounding amplified by Adadelta). The rebuilt stack keeps the compiled
    stack's tensors (`adopt`) and compiles nothing new."""
    from skdcgn.models.classifier import Classifier, ClassifierNetConfig
    from skdcgn.multitrain import _Stack, _step, _StepRunner

    cpu = torch.device("cpu")

    def shadows():
        runs = []
        for k, lr in enumerate((1.0, 0.7)):
            torch.manual_seed(k)
            model = Classifier(ClassifierNetConfig()).double()
            runs.append(types.SimpleNamespace(model=model, opt=torch.optim.Adadelta(model.parameters(), lr=lr),
                                              loss_sum=None, correct=None, done=False, step=0))
        return runs

    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.randint(10, (64,), generator=g)
    order = torch.randint(64, (6, 4, 2), generator=g)
    valid = torch.ones(4, 2, dtype=torch.float64)
    valid[3:, 1] = 0  # job 1's batch holds 3 images
    count = valid.sum(0)
    eager_runs, compiled_runs = shadows(), shadows()
    runner = _StepRunner(cpu, True)
    eager, stack = _Stack(eager_runs, cpu), runner.adopt(_Stack(compiled_runs, cpu))
    for s in range(6):
        if s == 3:  # an epoch end: both stacks rebuilt from their runs
            for k in range(2):
                eager.unstack(k)
                stack.unstack(k)
            eager, held, before = _Stack(eager_runs, cpu), stack.flat, _graphs()
            stack = runner.adopt(_Stack(compiled_runs, cpu))
            assert stack.flat is held
        _step(eager, images, labels, order[s], valid, count, False)
        runner(stack, images, labels, order[s], valid, count, False)
    if runner.mode == "eager":
        pytest.skip("torch.compile is unavailable here (the runner fell back to eager)")
    assert _graphs() == before
    for name in ("flat", "square_avg", "acc_delta", "loss_sum"):
        torch.testing.assert_close(getattr(stack, name), getattr(eager, name), atol=1e-12, rtol=0, msg=name)
    for name, buf in eager.buffers.items():
        torch.testing.assert_close(stack.buffers[name], buf, atol=1e-12, rtol=0, msg=name)
    assert torch.equal(stack.correct, eager.correct)


def test_a_failed_compilation_warns_once_and_trains_eagerly(monkeypatch, caplog, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(multitrain, "_COMPILED", {"default": broken})
    jobs = [dataclasses.replace(j, config=dataclasses.replace(j.config, max_steps=3)) for j in _jobs(tmp_path, "f")]
    with caplog.at_level(logging.WARNING, logger="skdcgn.multitrain"):
        fell_back = train_classifiers(jobs, progress=False, compile="on")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["classifier stack: torch.compile (default) failed (RuntimeError: no C++ compiler); "
                        "the stack runs eagerly"]
    eager = train_classifiers([dataclasses.replace(j, out_dir=None) for j in jobs], progress=False, compile="off")
    for a, b in zip(fell_back, eager):
        assert all(torch.equal(v, w) for v, w in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_compile_setting_is_checked_and_stays_out_of_the_identity(tmp_path, capsys):
    from skdcgn.cli import main
    from skdcgn.config import config_from_dict, identity
    from skdcgn.pipeline import RunConfig

    with pytest.raises(SkdcgnError, match="^compile: 'yes' is not one of auto, on, off$"):
        train_classifiers(_jobs(tmp_path, "v")[:1], compile="yes")
    assert not (tmp_path / "v0").exists()
    with pytest.raises(SkdcgnError, match="^classifier_compile: 'maybe' is not one of auto, on, off$"):
        RunConfig(classifier_compile="maybe").validate()
    assert main(["run", "--preset", "tiny", "--classifier-compile", "maybe", "--run-dir", str(tmp_path / "r"),
                 "--dump-config", str(tmp_path / "c.yaml")]) == 2
    assert capsys.readouterr().err.strip() == "skdcgn: error: classifier_compile: 'maybe' is not one of auto, on, off"
    assert identity(RunConfig(classifier_compile="on")) == identity(RunConfig())  # how a stack runs, not what it makes
    old = {k: v for k, v in dataclasses.asdict(RunConfig()).items() if k != "classifier_compile"}
    assert config_from_dict(RunConfig, old, "run_config.json").classifier_compile == "auto"  # records made before it


def test_the_speed_benchmark_reports_eager_and_compiled_rows(monkeypatch, tmp_path):
    """benchmarks/multitrain_speed.py --compile: its rows and table, with the "compiled" step replaced by
    the eager `_train_step` (the plumbing, not Inductor: gpu_protocol.sh times the real one)."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setattr(multitrain, "_COMPILED", {"default": multitrain._train_step})
    spec = importlib.util.spec_from_file_location("multitrain_speed", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "multitrain_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    record = bench.main(["--device", "cpu", "--ks", "1", "2", "--steps", "1", "--warmup", "0", "--batch-size", "4",
                         "--compile", "--compile-ks", "2", "--md", str(tmp_path / "s.md")])
    assert [(r["k"], r["step"]) for r in record["rows"]] == [(1, "eager"), (2, "eager"), (2, "default")]
    compiled = record["rows"][-1]
    assert compiled["compile_seconds"] >= 0 and compiled["vs_eager"] > 0
    assert compiled["max_abs_weight_difference"] < 1e-3  # checked against separate training as the eager stack is
    assert "| 2 | no | default |" in (tmp_path / "s.md").read_text()
