"""The notes a resumed run prints when its flags change the data stream or the learning rate."""
import dataclasses

from megatron_code.presets import get_preset
from megatron_code.training.arguments import run_config_from_values
from megatron_code.training.resume_notes import resume_notes

BASE = {**get_preset("tiny"), "data_path": ["data/a"], "train_iters": 1000, "lr": 3e-4, "min_lr": 3e-5,
        "lr_warmup_iters": 100, "lr_decay_style": "cosine", "global_batch_size": 16, "micro_batch_size": 2}


def notes(**changes) -> list[str]:
    saved = {"iteration": 400, "config": dataclasses.asdict(run_config_from_values(BASE))}
    return resume_notes(saved, run_config_from_values({**BASE, **changes}), 400, 6400)


def test_the_same_flags_give_no_note():
    assert notes() == []


def test_flags_that_move_the_data_stream_are_named_with_both_values():
    (line,) = notes(seed=7, seq_length=128)
    assert line.startswith("data stream changed (--seed 1234 -> 7; --seq-length 256 -> 128): the sample index "
                           "is rebuilt and read from sample 6,400 of the new one")
    (line,) = notes(data_path=["0.5", "data/a", "0.5", "data/b"])
    assert "--data-path ['data/a'] -> ['0.5', 'data/a', '0.5', 'data/b']" in line


def test_a_new_global_batch_continues_at_the_consumed_sample():
    assert notes(global_batch_size=32) == [
        "global batch size changed from 16 (checkpoint) to 32: the data continues at sample 6,400"]


def test_a_schedule_change_gives_the_next_steps_rate_under_both():
    # Cosine decay over --train-iters: doubling it moves step 401 from a third of the decay back
    # to a sixth, and the rate jumps up from 2.32e-4 to 2.84e-4.
    (line,) = notes(train_iters=2000)
    assert line.startswith("learning-rate schedule changed") and line.endswith(
        "step 401 runs at 0.0002836 where the checkpoint's run would use 0.0002321")
    assert notes(train_iters=2000, lr_decay_iters=1000) == []  # the decay pinned: the same rates
    assert notes(lr=1.5e-4, min_lr=1.5e-5)[0].endswith("step 401 runs at 0.000116 where the checkpoint's "
                                                         "run would use 0.0002321")
