"""Command line and config handling: precedence, Megatron flag names, and one clear error for
each bad input, raised before any model or dataset is built."""
import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from megatron_code.config_docs import undocumented_fields
from megatron_code.errors import ConfigError
from megatron_code.model.config import ModelConfig
from megatron_code.train import main
from megatron_code.training import config as training_config
from megatron_code.training.arguments import build_parser, parse_args
from megatron_code.training.validate import validate_run
from tests.conftest import TOKENIZER

MEGATRON_FLAGS = (
    "--num-layers --hidden-size --ffn-hidden-size --num-attention-heads --group-query-attention "
    "--num-query-groups --seq-length --max-position-embeddings --micro-batch-size --global-batch-size "
    "--train-iters --lr --min-lr --lr-warmup-iters --lr-decay-iters --lr-decay-style --weight-decay "
    "--clip-grad --bf16 --data-path --split --tokenizer-model --save --load --save-interval "
    "--eval-interval --eval-iters --log-interval --exit-interval --seed --wandb-project "
    "--reset-position-ids --reset-attention-mask --eod-mask-loss --untie-embeddings-and-output-weights "
    "--rotary-base --norm-epsilon --init-method-std --make-vocab-size-divisible-by --use-rope-scaling "
    "--log-straggler --straggler-minmax-count"
).split()


def test_megatron_flag_names_exist():
    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    missing = [flag for flag in MEGATRON_FLAGS if flag not in known]
    assert not missing


def test_every_config_field_is_documented():
    classes = [ModelConfig] + [
        obj for obj in vars(training_config).values()
        if dataclasses.is_dataclass(obj) and obj.__module__ == training_config.__name__
    ]
    assert {cls.__name__: undocumented_fields(cls) for cls in classes} == {cls.__name__: [] for cls in classes}


def test_precedence_preset_then_yaml_then_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model:\n  hidden-size: 512\n  num_layers: 6\nlr: 1e-3\ntrain_iters: 77\n")
    cfg = parse_args(["--preset", "tiny", "--config", str(yaml_file), "--num-layers", "3", "--no-bf16"])
    assert cfg.model.hidden_size == 512  # yaml over preset (256)
    assert cfg.model.num_layers == 3  # flag over yaml (6) over preset (4)
    assert cfg.model.ffn_hidden_size == 704  # preset over default
    assert cfg.optimizer.lr == pytest.approx(1e-3)  # yaml's "1e-3" string coerced to float
    assert cfg.training.train_iters == 77 and cfg.training.bf16 is False


def test_data_path_blend_and_lists_parse():
    cfg = parse_args(["--data-path", "0.3", "a", "0.7", "b", "--split", "90,10,0"])
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"] and cfg.data.split == "90,10,0"


@pytest.mark.parametrize(
    "text, message",
    [
        ("hiden_size: 3\n", "unknown field 'hiden_size'. Did you mean hidden_size"),
        ("lr: fast\n", "field 'lr' expects float, got 'fast'"),
        ("- 1\n- 2\n", "expected a mapping"),
    ],
)
def test_bad_yaml_names_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        parse_args(["--config", str(path)])
    assert str(path) in str(info.value)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*'7b'"):
        parse_args(["--preset", "huge"])


def _args(data_prefix, *extra):
    return ["--preset", "tiny", "--data-path", data_prefix, "--tokenizer-model", TOKENIZER,
            "--train-iters", "4", "--lr-warmup-iters", "1", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hidden-size", "250"], r"--hidden-size \(250\) must be divisible by --num-attention-heads \(4\)"),
        (["--num-query-groups", "3"], r"--num-attention-heads \(4\) must be divisible by --num-query-groups \(3\)"),
        (["--global-batch-size", "12"], r"--global-batch-size \(12\) must be divisible by --micro-batch-size \(8\)"),
        (["--vocab-size", "1000"], r"has 2048 tokens but --vocab-size is 1000"),
        (["--seq-length", "2048"], r"--seq-length \(2048\) exceeds --max-position-embeddings \(1024\)"),
        (["--tokenizer-model", "/nope/sp.model"], r"no file at '/nope/sp.model'"),
        (["--split", "100,0,0", "--eval-interval", "5"], r"needs a validation split"),
        (["--save-interval", "5"], r"--save-interval is set but --save"),
        (["--overlap-param-gather"], r"--overlap-param-gather overlaps the distributed optimizer's .* add "
                                     r"--use-distributed-optimizer"),
        (["--lr-decay-style", "step"], r"--lr-decay-style must be one of"),
        (["--lr-warmup-iters", "9"], r"--lr-warmup-iters \(9\) exceeds --lr-decay-iters \(4\)"),
        (["--attention-backend", "flash"], r"pip install flash-attn"),
        (["--params-dtype", "bfloat16", "--bf16"], r"--params-dtype bfloat16: training needs fp32 master weights\. "
                                                  r"Use --params-dtype bfloat16 with --bf16 and --use-distributed-opt"),
        (["--params-dtype", "float16", "--bf16", "--use-distributed-optimizer"], r"--params-dtype float16: training"),
        (["--params-dtype", "bfloat16", "--use-distributed-optimizer"], r"with --bf16 and --use-distributed"),
        (["--ddp-bucket-size", "0"], r"--ddp-bucket-size must be >= 1 \(gradient elements per bucket\), got 0"),
        (["--distributed-timeout-minutes", "-1"], r"--distributed-timeout-minutes must be > 0, got -1"),
        (["--exit-duration-in-mins", "0"], r"--exit-duration-in-mins must be > 0 \(minutes\), got 0"),
        # Out of range: each used to crash mid-run or train silently wrong (check_numbers' docstring).
        (["--log-interval", "0"], r"--log-interval must be >= 1, got 0"),
        (["--log-straggler", "--straggler-minmax-count", "0"], r"--straggler-minmax-count must be >= 1, got 0"),
        (["--no-load-optim", "--no-load-rng"], r"--no-load-optim and --no-load-rng without --load: there is no"),
        (["--skip-steps", "3-x"], r"--skip-steps: '3-x' is neither a step nor a FIRST-LAST range of steps"),
        (["--skip-steps", "0"], r"--skip-steps: '0' must lie within steps 1\.\.4 \(--train-iters\), first <= last"),
        (["--skip-steps", "3-2"], r"--skip-steps: '3-2' must lie within steps 1\.\.4"),
        (["--skip-steps", "2", "5"], r"--skip-steps: '5' must lie within steps 1\.\.4"),
        (["--adam-beta1", "1.5"], r"--adam-beta1 must be in \[0, 1\), got 1.5"),
        (["--lr", "-1"], r"--lr must be >= 0, got -1.0"),
        (["--min-lr", "1"], r"--min-lr \(1.0\) exceeds --lr \(0.002\): the decay would raise the rate"),
        (["--eval-interval", "2", "--eval-iters", "0"], r"--eval-iters must be >= 1, got 0"),
        (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32\), got -1"),
        (["--global-batch-size", "0"], r"--global-batch-size must be positive, got 0"),
        (["--seq-length", "0"], r"--seq-length must be > 0, got 0"),
        (["--num-workers", "-1"], r"--num-workers must be >= 0, got -1"),
        (["--hidden-dropout", "2"], r"--hidden-dropout must be in \[0, 1\), got 2.0"),
        (["--rotary-base", "0"], r"--rotary-base must be > 0, got 0.0"),
        (["--init-method-std", "-1"], r"--init-method-std must be > 0, got -1.0"),
        (["--valid-data-path", "/nope/held_out", "--eval-interval", "5"],
         r"--valid-data-path: /nope/held_out.bin does not exist"),
        (["--valid-data-path", "/nope/held_out", "--eval-interval", "0"], r"--eval-interval is 0: nothing would read it"),
        (["--valid-data-path", "/nope/held_out", "--mock-data"], r"--mock-data and --data-path / --valid-data-path"),
    ],
)
def test_bad_inputs_raise_one_clear_error(fixture_data, extra, message):
    if "flash" in extra and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match=message):
        validate_run(parse_args(_args(fixture_data, *extra)))


def test_a_load_that_would_silently_start_from_scratch_is_refused(fixture_data, tmp_path):
    """Each of these used to start from random weights (or fail inside the load): a checkpoint's
    own iter_* directory for a full resume, a typo'd --load other than --save, a marker naming a
    deleted checkpoint. An empty --load equal to --save is the restartable job's first start, and
    --finetune may take one iteration's directory."""
    root = tmp_path / "ckpt"
    (root / "iter_0000004").mkdir(parents=True)
    (root / "iter_0000004" / "train_state.json").write_text('{"iteration": 4}')
    check = lambda *flags: validate_run(parse_args(_args(fixture_data, *flags)))  # noqa: E731
    with pytest.raises(ConfigError, match=r"--load .*iter_0000004 is one checkpoint's directory\. A full resume loads "
                                          r"the latest checkpoint of a --save directory: give .*ckpt \(to resume from "
                                          r"this iteration .* write its number into .*ckpt/latest_checkpointed_iter"):
        check("--load", str(root / "iter_0000004"), "--save", str(root))
    check("--load", str(root / "iter_0000004"), "--finetune")  # weights only: one iteration's directory will do
    with pytest.raises(ConfigError, match=r"--load .*typo: no checkpoint there .* only when it equals --save"):
        check("--load", str(tmp_path / "typo"), "--save", str(tmp_path / "out"))
    check("--load", str(tmp_path / "out"), "--save", str(tmp_path / "out"))  # first start: accepted
    (root / "latest_checkpointed_iteration.txt").write_text("8")
    with pytest.raises(ConfigError, match=r"names iteration 8, but .*iter_0000008/train_state.json does not exist"):
        check("--load", str(root), "--save", str(root))
    (root / "latest_checkpointed_iteration.txt").write_text("4")
    check("--load", str(root), "--save", str(root))
    # Another run's checkpoints in --save: a fresh run or a fine-tune into them would replace them.
    for flags in ([], ["--load", str(tmp_path / "out"), "--finetune"], ["--load", str(root), "--finetune"]):
        with pytest.raises(ConfigError, match=r"--save .*ckpt already holds checkpoints \(latest: iteration 4\) "
                                              r"that this run does not resume from .* Use a new --save directory"):
            check("--save", str(root), *flags)


def test_missing_data_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere_text_document.bin does not exist"):
        validate_run(parse_args(_args(str(tmp_path / "nowhere_text_document"))))


def test_data_from_another_tokenizer_is_caught(fixture_data, tmp_path):
    """Token ids beyond the model's vocabulary mean the data was built with another tokenizer."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "foreign")
    builder = IndexedDatasetBuilder(prefix + ".bin")
    builder.add_item(torch.tensor([5, 40000, 2]))
    builder.end_document()
    builder.finalize(prefix + ".idx")
    with pytest.raises(ConfigError, match="token id 40000 is outside the model's vocabulary"):
        validate_run(parse_args(_args(prefix)))


def test_cli_prints_error_without_traceback_and_exits_2(fixture_data, capsys):
    assert main(_args(fixture_data, "--hidden-size", "250")) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcode-train: error: --hidden-size (250)") and "Traceback" not in err


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "megatron_code.train", "--help"], capture_output=True,
                         text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    assert "--num-query-groups" in out and "Number of key/value heads" in out


def test_bf16_parameters_are_refused_where_unverified(fixture_data):
    """Where Transformer Engine is not installed its own check fires first: the params-dtype check
    is called directly (it also guards the planner's layouts)."""
    from megatron_code.training.validate import check_params_dtype

    bf16 = ["--params-dtype", "bfloat16", "--bf16", "--use-distributed-optimizer"]
    with pytest.raises(ConfigError, match="--fp8-backend te has not been verified on a GPU"):
        check_params_dtype(parse_args(_args(fixture_data, *bf16, "--fp8-format", "hybrid", "--fp8-backend", "te")))
    with pytest.raises(ConfigError, match="zero-bubble schedules write weight gradients outside autograd's hooks"):
        check_params_dtype(parse_args(_args(fixture_data, *bf16, "--pipeline-model-parallel-size", "2",
                                            "--pipeline-schedule", "zbv")))
    check_params_dtype(parse_args(_args(fixture_data, *bf16)))  # the supported combination
