"""Training-loop tests: the loss falls, N + N resumed steps equal 2N steps, gradient accumulation
equals one big micro-batch, checkpoints survive a crash mid-save, and the logs carry the metrics."""
import dataclasses
import gc
import json
import os
import shutil

import pytest
import torch

from megatron_code.training import checkpointing
from megatron_code.training.arguments import run_config_from_values
from megatron_code.training.trainer import train
from tests.conftest import CORPUS, TOKENIZER, run_training, tiny_run


def losses(history):
    return [h["loss"] for h in history]


def test_tiny_loss_falls(fixture_data):
    history = run_training(tiny_run(fixture_data, train_iters=40, lr_warmup_iters=5))
    first, last = losses(history)[:5], losses(history)[-5:]
    assert sum(last) / 5 < sum(first) / 5 - 1.5, (first, last)


def test_resume_reproduces_uninterrupted_run_exactly(fixture_data, tmp_path):
    """Losses and grad norms of 4 steps + resume + 4 steps == 8 uninterrupted steps (fp32, CPU)."""
    common = dict(train_iters=8, lr_warmup_iters=2, micro_batch_size=2, global_batch_size=4)
    full = run_training(tiny_run(fixture_data, **common))
    ckpt = str(tmp_path / "ckpt")
    first = run_training(tiny_run(fixture_data, **common, save=ckpt, exit_interval=4))
    assert checkpointing.latest_iteration(ckpt) == 4
    second = run_training(tiny_run(fixture_data, **common, save=ckpt, load=ckpt))
    assert [h["step"] for h in first + second] == list(range(1, 9))
    assert losses(first + second) == losses(full)
    assert [h["grad_norm"] for h in first + second] == [h["grad_norm"] for h in full]
    assert [h["lr"] for h in first + second] == [h["lr"] for h in full]


def _samples_read(fixture_data, **values) -> list[int]:
    """Train; return the training-sample indices the run read, in order."""
    read = []

    class Recording(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            read.append(index)
            return self.dataset[index]

    def record(trainer):
        trainer.datasets = dataclasses.replace(trainer.datasets, train=Recording(trainer.datasets.train))

    train(run_config_from_values(tiny_run(fixture_data, **values)), prepare=record)
    return read


def test_resume_with_another_global_batch_size_continues_at_the_consumed_sample(fixture_data, tmp_path, capsys):
    """The data position is the checkpoint's consumed samples, not iteration x the new global
    batch: 2 steps of 4 samples + resume at 8 per step must read samples 8..23 next, as one run
    reading 32 samples would (the dataset index is built for the same 32)."""
    ckpt = str(tmp_path / "ckpt")
    stream = _samples_read(fixture_data, train_iters=8, global_batch_size=4, micro_batch_size=4)
    first = _samples_read(fixture_data, train_iters=8, global_batch_size=4, micro_batch_size=4,
                          save=ckpt, exit_interval=2)
    assert first == stream[:8]
    resumed = _samples_read(fixture_data, train_iters=5, global_batch_size=8, micro_batch_size=4,
                            save=ckpt, load=ckpt)
    assert resumed == stream[8:32]
    assert "note: global batch size changed from 4 (checkpoint) to 8: the data continues at sample 8\n" in \
        capsys.readouterr().out
    with open(os.path.join(checkpointing.checkpoint_dir(ckpt, 5), "train_state.json")) as fh:
        assert json.load(fh)["consumed_samples"] == 32


def test_a_validation_set_of_its_own(fixture_data, tmp_path):
    """--valid-data-path: validation reads only its own data, and every document of --data-path
    trains (the training losses equal those of --split 1,0,0)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_tools.preprocess_data import preprocess_data

    held_out = tmp_path / "held_out.jsonl"
    with open(CORPUS) as source, open(held_out, "w") as sink:
        sink.writelines(line for i, line in enumerate(source) if i % 5 == 0)  # another document mix
    valid = preprocess_data(str(held_out), TOKENIZER, str(tmp_path / "held_out"), workers=1,
                            progress=False).outputs["text"]
    seen = {}

    def inspect(trainer):
        seen.update(train=trainer.datasets.train, valid=trainer.datasets.valid)

    def valid_losses(metrics):
        return [json.loads(line)["valid_loss"] for line in open(metrics) if '"valid_loss"' in line]

    common = dict(train_iters=4, micro_batch_size=2, global_batch_size=2, seq_length=64, eval_iters=2)
    own, split = str(tmp_path / "own.jsonl"), str(tmp_path / "split.jsonl")
    with_own = train(run_config_from_values(tiny_run(
        fixture_data, **common, valid_data_path=[valid], eval_interval=2, metrics_file=own)), prepare=inspect)
    assert seen["valid"].dataset.path_prefix == valid and seen["train"].dataset.path_prefix == fixture_data
    assert len(seen["train"].indices) == len(IndexedDataset(fixture_data))  # no document held back
    assert losses(with_own) == losses(run_training(tiny_run(fixture_data, **common, split="1,0,0")))
    run_training(tiny_run(fixture_data, **common, eval_interval=2, metrics_file=split))
    assert len(valid_losses(own)) == 2 and valid_losses(own) != valid_losses(split)


def test_gradient_accumulation_equals_one_large_micro_batch(fixture_data):
    """The loss is a mean over all loss tokens of the global batch, so cutting the batch into
    micro-batches changes nothing but rounding."""
    one = run_training(tiny_run(fixture_data, train_iters=3, micro_batch_size=4, global_batch_size=4))
    four = run_training(tiny_run(fixture_data, train_iters=3, micro_batch_size=1, global_batch_size=4))
    for a, b in zip(one, four):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_crash_during_save_leaves_previous_checkpoint_loadable(fixture_data, tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ckpt")
    run_training(tiny_run(fixture_data, train_iters=2, save=ckpt))
    assert checkpointing.latest_iteration(ckpt) == 2

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash mid-save")

    monkeypatch.setattr(checkpointing.dcp, "save", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(tiny_run(fixture_data, train_iters=4, save=ckpt, load=ckpt))
    monkeypatch.undo()
    assert checkpointing.latest_iteration(ckpt) == 2
    assert not os.path.exists(checkpointing.checkpoint_dir(ckpt, 4))
    resumed = run_training(tiny_run(fixture_data, train_iters=3, save=ckpt, load=ckpt))
    assert [h["step"] for h in resumed] == [3]


def test_checkpoint_holds_model_optimizer_rng_and_data_position(fixture_data, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_training(tiny_run(fixture_data, train_iters=3, save=ckpt, global_batch_size=8))
    final = checkpointing.checkpoint_dir(ckpt, 3)
    with open(os.path.join(final, "train_state.json")) as fh:
        state = json.load(fh)
    assert state["iteration"] == 3 and state["consumed_samples"] == 24
    assert state["config"]["model"]["num_layers"] == 4
    assert os.path.isfile(os.path.join(final, "rng", "rank_00000.pt"))
    assert os.path.isfile(os.path.join(final, ".metadata"))
    assert not [p for p in os.listdir(ckpt) if p.endswith(".tmp")]


def test_finetune_loads_weights_only_and_restarts_at_zero(fixture_data, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    pretrain = run_training(tiny_run(fixture_data, train_iters=6, save=ckpt))
    tuned = run_training(tiny_run(fixture_data, train_iters=2, load=ckpt, finetune=True))
    assert [h["step"] for h in tuned] == [1, 2]
    assert tuned[0]["loss"] < pretrain[0]["loss"] - 0.5  # starts from trained weights


def test_finetune_from_one_iteration_directory_takes_that_iteration(fixture_data, tmp_path):
    """--finetune --load ROOT/iter_0000003 loads iteration 3, not the latest (6): the same weights
    as a copy of ROOT whose latest marker says 3."""
    ckpt = tmp_path / "ckpt"
    run_training(tiny_run(fixture_data, train_iters=6, save=str(ckpt), save_interval=3))
    rolled_back = tmp_path / "rolled_back"
    shutil.copytree(ckpt, rolled_back)
    (rolled_back / checkpointing.LATEST_MARKER).write_text("3")
    losses_from = lambda load: losses(run_training(tiny_run(fixture_data, train_iters=2, load=load, finetune=True)))  # noqa: E731
    from_iteration_dir = losses_from(str(ckpt / "iter_0000003"))
    assert from_iteration_dir == losses_from(str(rolled_back))
    assert from_iteration_dir != losses_from(str(ckpt))


def test_metrics_file_has_one_object_per_step(fixture_data, tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    run_training(tiny_run(fixture_data, train_iters=4, metrics_file=str(metrics), log_interval=2,
                          eval_interval=2, eval_iters=1, tensorboard_dir=str(tmp_path / "tb")))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "ms_per_step", "peak_mem_gib"):
        assert all(isinstance(r[key], float) for r in steps), key
    assert [r["step"] for r in records if "valid_loss" in r] == [2, 4]
    out = capsys.readouterr().out
    assert "step      2/4 | loss" in out and "tok/s" in out and "grad norm" in out
    assert "validation  step      2" in out
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_a_resumed_run_supersedes_the_crashed_segment_in_the_metrics(fixture_data, tmp_path, monkeypatch):
    """A run that crashed after logging steps 3-4 (its save at 4 failed) resumes from step 2 and
    logs 3-4 again: the JSONL marks the resume point, and TensorBoard shows each step once, with
    the resumed run's values (SummaryWriter's purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt, metrics, tb = str(tmp_path / "ckpt"), tmp_path / "m.jsonl", str(tmp_path / "tb")
    logging = dict(save=ckpt, load=ckpt, metrics_file=str(metrics), tensorboard_dir=tb)
    run_training(tiny_run(fixture_data, train_iters=2, **logging))

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash mid-save")

    monkeypatch.setattr(checkpointing.dcp, "save", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(tiny_run(fixture_data, train_iters=4, lr=1e-2, **logging))  # other losses
    monkeypatch.undo()
    resumed = run_training(tiny_run(fixture_data, train_iters=4, **logging))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    marks = [r.get("resumed_from_step", r.get("step")) for r in records if "loss" in r or "resumed_from_step" in r]
    assert marks == [1, 2, 2, 3, 4, 2, 3, 4]
    events = EventAccumulator(tb)
    events.Reload()
    shown = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in shown] == [1, 2, 3, 4]
    assert [value for _, value in shown[2:]] == pytest.approx([h["loss"] for h in resumed])


def _collections_during_training(fixture_data, **values) -> list[tuple[int, int]]:
    """(iteration last launched, generation) of each garbage collection between the first step's
    launch and the end of the loop (not the teardown after it, which collects on purpose)."""
    seen, launched, done = [], [], []

    def watch(phase, info):
        if phase == "start" and launched and not done:
            seen.append((launched[-1], info["generation"]))

    def record(trainer):
        trainer.step_hooks.append(launched.append)
        run = trainer.run
        trainer.run = lambda: (run(), done.append(True))[0]

    gc.callbacks.append(watch)
    try:
        train(run_config_from_values(tiny_run(fixture_data, **values)), prepare=record)
    finally:
        gc.callbacks.remove(watch)
    return seen


def test_manual_gc_collects_on_schedule_only_and_restores_the_collector(fixture_data):
    """--manual-gc: no automatic collection during the loop, one of generation 1 at every
    --manual-gc-interval'th step; the automatic collector is back on after the run, also after a
    failed one. Without the flag the same run collects automatically (what the flag removes)."""
    common = dict(train_iters=5, micro_batch_size=2, global_batch_size=2, seq_length=64)
    assert any(generation == 0 for _, generation in _collections_during_training(fixture_data, **common))
    assert gc.isenabled()
    manual = _collections_during_training(fixture_data, **common, manual_gc=True, manual_gc_interval=2)
    assert manual == [(2, 1), (4, 1)]  # the young generations: what the steps leave
    assert gc.isenabled()
    with pytest.raises(FloatingPointError):
        run_training(tiny_run(fixture_data, **common, manual_gc=True, lr=1e30, min_lr=1e29, lr_warmup_iters=0,
                              clip_grad=0.0))
    assert gc.isenabled()


def test_time_limit_saves_and_stops_like_a_signal(fixture_data, tmp_path, capsys):
    """--exit-duration-in-mins: past the limit (here at once) the run stops after the step whose
    agreement saw it, saves, says why, and the checkpoint resumes to the uninterrupted result."""
    ckpt = str(tmp_path / "ckpt")
    common = dict(train_iters=6, micro_batch_size=2, global_batch_size=2, seq_length=64)
    stopped = run_training(tiny_run(fixture_data, **common, save=ckpt, exit_duration_in_mins=1e-9))
    assert len(stopped) < 6 and checkpointing.latest_iteration(ckpt) == stopped[-1]["step"]
    assert (f"time limit (--exit-duration-in-mins 1e-09): stopped after iteration {stopped[-1]['step']}/6, "
            f"checkpoint {ckpt}/iter_{stopped[-1]['step']:07d}; resume with --load {ckpt}") in capsys.readouterr().out
    resumed = run_training(tiny_run(fixture_data, **common, save=ckpt, load=ckpt))
    assert losses(stopped + resumed) == losses(run_training(tiny_run(fixture_data, **common)))


def test_wandb_runs_offline_by_default(fixture_data, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_training(tiny_run(fixture_data, train_iters=2, wandb_project="unit", wandb_save_dir=str(tmp_path)))
    assert os.environ["WANDB_MODE"] == "offline"
    runs = os.listdir(tmp_path / "wandb")
    assert any(name.startswith("offline-run-") for name in runs), runs


def test_bf16_autocast_training_runs_and_learns(fixture_data):
    history = run_training(tiny_run(fixture_data, train_iters=12, bf16=True, lr_warmup_iters=2))
    assert torch.isfinite(torch.tensor(losses(history))).all()
    assert losses(history)[-1] < losses(history)[0]


@pytest.mark.parametrize("save_interval", [1, None], ids=["saving-every-step", "saving-at-the-end"])
def test_a_non_finite_gradient_norm_stops_the_run_and_its_step_is_not_saved(fixture_data, tmp_path,
                                                                           save_interval):
    """A step's loss and gradient norm are read back once the next step is launched
    (training/launched_step.py), or at once before a save. With lr 1e30 step 2's loss is still
    finite but its gradients are NaN, so its update poisons the weights: the run must stop there,
    naming the iteration, with no checkpoint of that step or any later one."""
    save = str(tmp_path / "ckpt")
    values = tiny_run(fixture_data, train_iters=5, lr=1e30, min_lr=1e29, lr_warmup_iters=0, clip_grad=0.0,
                      micro_batch_size=2, global_batch_size=2, seq_length=64, save=save, save_interval=save_interval)
    with pytest.raises(FloatingPointError, match=r"gradient norm is nan at iteration 2 \(loss 7\.\d+\)"):
        run_training(values)
    saved = sorted(d for d in os.listdir(save) if d.startswith("iter_")) if os.path.exists(save) else []
    assert saved == (["iter_0000001"] if save_interval else [])


def test_each_step_is_read_back_after_the_next_one_is_launched(fixture_data):
    """The host never waits for the step it just launched: step k's record is logged after step
    k + 1 is queued (so the GPU is never left without work while the host logs and loads data), and
    at once where the host must know it (validation at step 2, the last step)."""
    events = []

    def watch(trainer):
        trainer.step_hooks.append(lambda iteration: events.append(f"launch {iteration}"))
        log_step = trainer.metrics.log_step
        trainer.metrics.log_step = lambda record: (events.append(f"log {record['step']}"), log_step(record))

    def validated(trainer):
        watch(trainer)
        log_validation = trainer.metrics.log_validation
        trainer.metrics.log_validation = lambda step, *a, **k: (events.append(f"valid {step}"),
                                                                log_validation(step, *a, **k))

    train(run_config_from_values(tiny_run(fixture_data, train_iters=5, eval_interval=2, eval_iters=1)),
          prepare=validated)
    # Validation every 2 steps and at the last one (5), whose weights would otherwise get no value.
    assert events == ["launch 1", "launch 2", "log 1", "log 2", "valid 2", "launch 3", "launch 4", "log 3", "log 4",
                      "valid 4", "launch 5", "log 5", "valid 5"]


def test_weights_only_load_gives_bf16_parameters_the_checkpoints_fp32_master_weights(fixture_data, tmp_path):
    """--finetune (no optimizer state) into bf16 parameters under ZeRO-1: the master weights are the
    checkpoint's fp32 values exactly, the parameters their bf16 rounding; the Adam state is untouched."""
    from megatron_code.model import GPTModel
    from megatron_code.parallel.distributed_optimizer import DistributedOptimizer
    from megatron_code.parallel.state import ParallelState

    ckpt = str(tmp_path / "ckpt")
    values = tiny_run(fixture_data, train_iters=2, micro_batch_size=2, global_batch_size=4, bf16=True, save=ckpt)
    run_training(values)  # fp32 parameters: their own master weights
    cfg = run_config_from_values({**values, "params_dtype": "bfloat16", "use_distributed_optimizer": True,
                                  "vocab_size": 2048})
    saved = GPTModel(cfg.model.replace(params_dtype="float32"))
    checkpointing.load_checkpoint(ckpt, saved, None, ParallelState(), restore_rng=False)
    model = GPTModel(cfg.model)
    optimizer = DistributedOptimizer(model, cfg.optimizer, ParallelState(), None)
    checkpointing.load_checkpoint(ckpt, model, optimizer, ParallelState(), restore_rng=False, optimizer_state=False)
    masters = optimizer.full_master_weights(gather=True)
    for (name, p), q in zip(model.named_parameters(), saved.parameters()):
        assert torch.equal(masters[p], q) and torch.equal(p, q.bfloat16()), name
        assert p.dtype == torch.bfloat16 and q.dtype == torch.float32
    assert all(not s.any() for b in optimizer.buckets for s in b.state.values())


def _trained_batches(fixture_data, **values):
    """Train; return (the step records, the tokens each optimizer step trained on, the trainer)."""
    batches, trainers = [], []

    def record(trainer):
        train_step = trainer.train_step

        def recording(micro_batches):
            batches.append(torch.cat([b["tokens"] for b in micro_batches]))
            return train_step(micro_batches)
        trainer.train_step = recording
        trainers.append(trainer)

    history = train(run_config_from_values(tiny_run(fixture_data, **values)), prepare=record)
    return history, batches, trainers[0]


def test_skipped_steps_drop_their_batches_and_the_rest_train_as_before(fixture_data, tmp_path):
    """--skip-steps 3-4: steps 1, 2, 5, 6 train on the batches the unskipped run gives them, at
    its learning rates; 3 and 4 update nothing (AdamW counts 4 steps) and are logged as skipped."""
    common = dict(train_iters=6, lr_warmup_iters=2, micro_batch_size=2, global_batch_size=4)
    full, full_batches, _ = _trained_batches(fixture_data, **common)
    metrics = str(tmp_path / "m.jsonl")
    skipped, batches, trainer = _trained_batches(fixture_data, **common, skip_steps=["3-4"], metrics_file=metrics)
    assert [h["step"] for h in skipped] == [1, 2, 5, 6]
    assert len(batches) == 4 and all(torch.equal(mine, full_batches[i]) for mine, i in zip(batches, [0, 1, 4, 5]))
    assert losses(skipped[:2]) == losses(full[:2]) and losses(skipped[2:]) != losses(full[4:])
    assert [h["lr"] for h in skipped] == [full[i]["lr"] for i in (0, 1, 4, 5)]
    assert {int(state["step"]) for state in trainer.optimizer.state.values()} == {4}
    records = [json.loads(line) for line in open(metrics)]
    assert [r["step"] for r in records if r.get("skipped")] == [3, 4]
    assert [r["step"] for r in records if "step" in r] == [1, 2, 3, 4, 5, 6]  # in step order
    assert [r["consumed_samples"] for r in records if "step" in r] == [4, 8, 12, 16, 20, 24]


def test_a_run_stopped_inside_a_skipped_range_resumes_past_it_exactly(fixture_data, tmp_path, capsys):
    common = dict(train_iters=6, lr_warmup_iters=2, micro_batch_size=2, global_batch_size=4, skip_steps=["3-4"])
    whole = run_training(tiny_run(fixture_data, **common))
    ckpt = str(tmp_path / "ckpt")
    first = run_training(tiny_run(fixture_data, **common, save=ckpt, exit_interval=3))
    assert checkpointing.latest_iteration(ckpt) == 3 and [h["step"] for h in first] == [1, 2]
    capsys.readouterr()
    second = run_training(tiny_run(fixture_data, **common, save=ckpt, load=ckpt))
    assert "skipping steps 4 (--skip-steps): 1 global batch, 4 samples read and not trained on" in capsys.readouterr().out
    assert losses(first + second) == losses(whole) and [h["step"] for h in second] == [5, 6]


def test_the_skips_ahead_are_named_as_ranges():
    from megatron_code.training.skip_steps import describe_skips, parse_skip_steps

    steps = parse_skip_steps(["7-9", "2-3", "5", "5"], train_iters=10)
    assert steps == {2, 3, 5, 7, 8, 9}
    assert describe_skips(steps, after=2, global_batch_size=4) == (
        "skipping steps 3, 5, 7-9 (--skip-steps): 5 global batches, 20 samples read and not trained on")
    assert describe_skips(steps, after=9, global_batch_size=4) is None


def test_no_load_optim_resumes_the_weights_with_fresh_adamw_moments(fixture_data, tmp_path, capsys):
    """Step 5's loss comes from the resumed weights and data (equal to the uninterrupted run's);
    its update starts AdamW afresh, so step 6 differs; the schedule and data position go on and
    AdamW counts only the 4 steps since the resume."""
    common = dict(train_iters=8, lr_warmup_iters=2, micro_batch_size=2, global_batch_size=4)
    whole = run_training(tiny_run(fixture_data, **common))
    ckpt = str(tmp_path / "ckpt")
    run_training(tiny_run(fixture_data, **common, save=ckpt, exit_interval=4))
    capsys.readouterr()
    trainers = []
    resumed = train(run_config_from_values(tiny_run(fixture_data, **common, save=ckpt, load=ckpt, load_optim=False)),
                    prepare=trainers.append)
    assert "note: not loaded: AdamW's state (--no-load-optim: moments and step counts start fresh)" in \
        capsys.readouterr().out
    assert [h["step"] for h in resumed] == [5, 6, 7, 8] and resumed[0]["loss"] == whole[4]["loss"]
    assert resumed[1]["loss"] != whole[5]["loss"]
    assert [h["lr"] for h in resumed] == [h["lr"] for h in whole[4:]]
    assert [h["consumed_samples"] for h in resumed] == [h["consumed_samples"] for h in whole[4:]]
    assert {int(state["step"]) for state in trainers[0].optimizer.state.values()} == {4}


def test_no_load_rng_draws_other_dropout_masks_after_the_resume(fixture_data, tmp_path):
    common = dict(train_iters=6, lr_warmup_iters=2, micro_batch_size=2, global_batch_size=4, hidden_dropout=0.1)
    whole = run_training(tiny_run(fixture_data, **common))
    ckpt = str(tmp_path / "ckpt")
    run_training(tiny_run(fixture_data, **common, save=ckpt, exit_interval=3))
    with_rng = run_training(tiny_run(fixture_data, **common, save=ckpt, load=ckpt))
    assert losses(with_rng) == losses(whole[3:])  # the RNG restored: the same masks
    for name in os.listdir(ckpt):  # back to iteration 3 for the second resume
        if name.startswith("iter_") and name != "iter_0000003":
            shutil.rmtree(os.path.join(ckpt, name))
    with open(os.path.join(ckpt, checkpointing.LATEST_MARKER), "w") as fh:
        fh.write("3\n")
    without_rng = run_training(tiny_run(fixture_data, **common, save=ckpt, load=ckpt, load_rng=False))
    assert losses(without_rng)[0] != whole[3]["loss"]  # dropout drew other masks from step 4 on
