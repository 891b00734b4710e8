"""Many classifiers in one process (skdcgn.multitrain): the same folders as train_classifier, the
same numbers within floating-point tolerance, a bitwise resume after an interruption."""
from __future__ import annotations

import json

import pytest
import torch

import skdcgn
from skdcgn.invariance import ClassifierConfig, train_classifier
from skdcgn.multitrain import ClassifierJob, train_classifiers

from test_invariance import separable_set


def _jobs(root, name: str, monitor) -> list[ClassifierJob]:
    """Four jobs of different sizes, step counts, subsets and epochs; two share one images tensor."""
    a, b = separable_set(120), separable_set(100, seed=3)
    configs = [ClassifierConfig(epochs=2, batch_size=16, seed=0, device="cpu"),  # 8 steps/epoch, a short last batch
               ClassifierConfig(epochs=2, batch_size=16, seed=1, device="cpu"),  # the same data, another seed
               ClassifierConfig(epochs=3, batch_size=16, seed=2, device="cpu", max_examples=50),  # 4 steps/epoch
               ClassifierConfig(epochs=2, batch_size=16, seed=3, device="cpu", max_steps=9)]  # 7 + 2 steps
    return [ClassifierJob(*data, config, root / f"{name}{i}", monitor)
            for i, (data, config) in enumerate(zip([a, a, b, b], configs))]


def _manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    root = tmp_path_factory.mktemp("batched")
    monitor = {"test": separable_set(60, seed=9)}
    jobs = _jobs(root, "b", monitor)
    return root, monitor, jobs, train_classifiers(jobs, progress=False)


def test_batched_training_equals_separate_training(batched, tmp_path):
    root, monitor, jobs, models = batched
    for i, (job, model) in enumerate(zip(jobs, models)):
        alone = train_classifier(job.images, job.labels, job.config, tmp_path / f"s{i}", progress=False, monitor=monitor)
        for (name, v), w in zip(alone.state_dict().items(), model.state_dict().values()):
            if v.is_floating_point():
                torch.testing.assert_close(w, v, atol=5e-3, rtol=1e-2, msg=f"job {i} {name}")
            else:
                assert torch.equal(v, w), name  # num_batches_tracked: the same number of steps
        seq, bat = _manifest(tmp_path / f"s{i}"), _manifest(job.out_dir)
        assert bat["config"] == seq["config"] and bat["monitor"] == seq["monitor"]  # the same stage
        assert len(bat["log"]) == len(seq["log"])
        for r, s in zip(bat["log"], seq["log"]):
            assert set(r) == set(s) and (r["epoch"], r["steps"], r["lr"]) == (s["epoch"], s["steps"], s["lr"])
            assert r["loss"] == pytest.approx(s["loss"], abs=1e-3)
            assert r["accuracy"] == pytest.approx(s["accuracy"], abs=0.03)  # at most a few of 50-120 images
            assert r["test_accuracy"] == pytest.approx(s["test_accuracy"], abs=0.05)  # 3 of 60
        header = (job.out_dir / "train_log.csv").read_text().splitlines()[0]
        assert header == (tmp_path / f"s{i}" / "train_log.csv").read_text().splitlines()[0]
    assert [len(_manifest(j.out_dir)["log"]) for j in jobs] == [2, 2, 3, 2]


def test_folders_are_interchangeable_with_train_classifier(batched, tmp_path):
    root, monitor, jobs, models = batched
    job = jobs[2]
    # a batched folder is complete for train_classifier: loaded, not retrained
    again = train_classifier(job.images, job.labels, job.config, job.out_dir, progress=False, monitor=monitor)
    assert all(torch.equal(v, w) for v, w in zip(models[2].state_dict().values(), again.state_dict().values()))
    assert isinstance(skdcgn.load_classifier(job.out_dir), skdcgn.models.classifier.Classifier)
    # and the other way: a folder of train_classifier is skipped by the batched trainer
    alone = train_classifier(job.images, job.labels, job.config, tmp_path / "seq", progress=False)
    before = (tmp_path / "seq" / "manifest.json").read_bytes()
    (loaded,) = train_classifiers([ClassifierJob(job.images, job.labels, job.config, tmp_path / "seq")], progress=False)
    assert (tmp_path / "seq" / "manifest.json").read_bytes() == before
    assert all(torch.equal(v, w) for v, w in zip(alone.state_dict().values(), loaded.state_dict().values()))
    # a sequential run resumes a batched checkpoint (the one training-state format)
    def stop(index, epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifiers([ClassifierJob(job.images, job.labels, job.config, tmp_path / "mixed")], progress=False,
                          on_epoch_end=stop)
    resumed = train_classifier(job.images, job.labels, job.config, tmp_path / "mixed", progress=False)
    for v, w in zip(models[2].state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(w, v, atol=5e-3, rtol=1e-2, check_dtype=True)


@pytest.mark.parametrize("stop_at", [(0, 1), (2, 2)])
def test_an_interrupted_batched_run_resumes_bitwise(batched, tmp_path, stop_at):
    """Interrupted at one job's epoch end (the others mid-epoch, or done), then resumed: each job
    continues from its own checkpoint and ends bitwise equal to the uninterrupted batched run."""
    root, monitor, jobs, models = batched

    def stop(index, epoch, row):
        if (index, epoch) == stop_at:
            raise KeyboardInterrupt

    resumed_jobs = _jobs(tmp_path, "r", monitor)
    with pytest.raises(KeyboardInterrupt):
        train_classifiers(resumed_jobs, progress=False, on_epoch_end=stop)
    assert not (resumed_jobs[stop_at[0]].out_dir / "manifest.json").exists()
    resumed = train_classifiers(resumed_jobs, progress=False)
    for i, (model, again) in enumerate(zip(models, resumed)):
        for (name, v), w in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(v, w), f"job {i} {name}"
        logs = [[{**r, "seconds": 0} for r in _manifest(j.out_dir)["log"]] for j in (jobs[i], resumed_jobs[i])]
        assert logs[0] == logs[1]


def test_a_compacted_stack_trains_the_same_classifiers(batched, tmp_path):
    """compact=True (the GPU default): a job that is done leaves the stack, whose shape then changes;
    the weights agree with the fixed-slot run within float tolerance."""
    root, monitor, jobs, models = batched
    compacted = train_classifiers(_jobs(tmp_path, "c", None), progress=False, compact=True)
    for i, (model, other) in enumerate(zip(models, compacted)):
        for (name, v), w in zip(model.state_dict().items(), other.state_dict().values()):
            torch.testing.assert_close(w, v, atol=5e-3, rtol=1e-2, msg=f"job {i} {name}")


def test_the_speed_benchmark_runs_and_its_stack_matches_separate_training(tmp_path):
    """benchmarks/multitrain_speed.py at a tiny size on the CPU (the GPU script runs it full size)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "multitrain_speed.py"
    spec = importlib.util.spec_from_file_location("multitrain_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    record = bench.main(["--device", "cpu", "--ks", "1", "2", "--steps", "2", "--warmup", "0", "--batch-size", "4",
                         "--json", str(tmp_path / "s.json"), "--md", str(tmp_path / "s.md")])
    assert json.loads((tmp_path / "s.json").read_text()) == record
    assert [(r["k"], r["bf16"]) for r in record["rows"]] == [(1, False), (2, False)]
    assert all(r["ms_per_step"] > 0 and r["speedup"] > 0 for r in record["rows"])
    assert record["rows"][-1]["max_abs_weight_difference"] < 1e-3  # the stack trains what separate runs train
    assert "| 2 | no |" in (tmp_path / "s.md").read_text()


def test_unstacked_architectures_fall_back_to_train_classifier_and_bad_jobs_are_refused(tmp_path):
    from skdcgn.errors import SkdcgnError

    x, y = separable_set(40)
    example = ClassifierConfig(arch="mnist_example", epochs=1, batch_size=16, seed=4, device="cpu", max_steps=2)
    cgn = ClassifierConfig(epochs=1, batch_size=16, seed=4, device="cpu", max_steps=2)
    got = train_classifiers([ClassifierJob(x, y, example, tmp_path / "e"), ClassifierJob(x, y, cgn, tmp_path / "c")],
                            progress=False)
    alone = train_classifier(x, y, example, tmp_path / "e-alone", progress=False)  # the same code path: bitwise
    assert all(torch.equal(v, w) for v, w in zip(alone.state_dict().values(), got[0].state_dict().values()))
    assert _manifest(tmp_path / "e")["config"] == _manifest(tmp_path / "e-alone")["config"]
    with pytest.raises(SkdcgnError, match="share one folder"):
        train_classifiers([ClassifierJob(x, y, cgn, tmp_path / "same"), ClassifierJob(x, y, example, tmp_path / "same")])
    with pytest.raises(SkdcgnError, match="labels"):  # every job checked before any is trained
        train_classifiers([ClassifierJob(x, y, cgn, tmp_path / "ok"), ClassifierJob(x, y[:5], cgn, tmp_path / "bad")])
    assert not (tmp_path / "ok" / "manifest.json").exists()


def test_the_stack_computes_the_maths_of_separate_classifiers_in_float64():
    """In float64 the rounding differences vanish: the stacked forward (grouped convolutions, masked
    BatchNorm, einsum head), its running statistics and the per-job Adadelta with per-job learning
    rates equal K separate nn.Module + torch.optim.Adadelta steps to ~1e-12, a short (padded) batch included."""
    import types

    import torch.nn.functional as F

    from skdcgn.models.classifier import Classifier, ClassifierNetConfig
    from skdcgn.multitrain import _Stack

    K, B, lrs = 3, 8, (1.0, 0.7, 0.49)
    runs = []
    for k in range(K):
        torch.manual_seed(k)
        model = Classifier(ClassifierNetConfig()).double()
        runs.append(types.SimpleNamespace(model=model, opt=torch.optim.Adadelta(model.parameters(), lr=lrs[k]),
                                          loss_sum=None, correct=None, done=False))
    stack = _Stack(runs, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.rand(B, K, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
        y = torch.randint(10, (B, K), generator=g)
        valid = torch.ones(B, K, dtype=torch.float64)
        if step == 2:
            valid[5:, 1] = 0  # job 1's last batch holds 5 images
        count = valid.sum(0)
        logits = stack.forward(x, valid, count)
        ce = F.cross_entropy(logits.reshape(B * K, 10), y.reshape(-1), reduction="none").view(B, K)
        (grad,) = torch.autograd.grad(((ce * valid).sum(0) / count).sum(), stack.flat)
        stack.adadelta(grad)
        for k, run in enumerate(runs):  # the reference: each classifier alone, on its real images only
            n = int(count[k])
            run.model.train()
            loss = F.cross_entropy(run.model(x[:n, k]), y[:n, k])
            run.opt.zero_grad()
            loss.backward()
            run.opt.step()
    params = stack.views(stack.flat.detach())
    for k, run in enumerate(runs):
        for name, p in run.model.named_parameters():
            torch.testing.assert_close(params[name][k], p.detach(), atol=1e-12, rtol=1e-10, msg=f"job {k} {name}")
        for name, b in run.model.named_buffers():
            torch.testing.assert_close(stack.buffers[name][k], b, atol=1e-12, rtol=1e-10, msg=f"job {k} {name}")
