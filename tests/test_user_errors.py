"""Malformed inputs, tried as a new user would, through the CLI's main(argv) in-process: each exits 2
with one message naming the input, and no traceback (issue 17's probe of user errors)."""

import pytest

from solray.cli import UsageError, main

PLUGINS = {
    "syntax_error_plugin.py": "class Broken(:\n",
    "raising_plugin.py": "raise RuntimeError('plugin import failed on purpose')\n",
    "not_a_reward_plugin.py": "class NotAReward:\n    pass\n",
}
FILES = {
    "empty.txt": b"",
    "blank.txt": b"\n  \n\n",
    "binary.txt": b"\xff\xfe\x00\x01binary",
    "bad.yaml": b"run:\n  steps: [\n",
    "duplicate.yaml": b"run:\n  steps: 1\n  steps: 2\n",
    "latin1.yaml": b"run:\n  name: caf\xe9\n",
    "list.yaml": b"- run\n- steps\n",
    "unknown_section.yaml": b"runn:\n  steps: 1\n",
    "lora_dir/readme.txt": b"not a LoRA",
}
TRAIN = ["train", "recipes/tiny_nft.yaml"]
CASES = [
    # recipes and overrides
    (["train", "{tmp}/missing.yaml"], "recipe file '{tmp}/missing.yaml' does not exist"),
    (["train", "{tmp}/bad.yaml"], "not valid YAML (line 3, column 1)"),
    (["train", "{tmp}/duplicate.yaml"], "key 'steps' given twice (lines 2 and 3)"),
    (["train", "{tmp}/latin1.yaml"], "latin1.yaml: not UTF-8 text (byte 16: invalid continuation byte)"),
    (["train", "{tmp}/unknown_section.yaml"], "runn: Extra inputs are not permitted"),
    ([*TRAIN, "foo.bar=1"], "foo: Extra inputs are not permitted"),
    ([*TRAIN, "run.stepz=1"], "run.stepz: Extra inputs are not permitted"),
    ([*TRAIN, "run.steps"], "override 'run.steps' must look like section.key=value"),
    ([*TRAIN, "run.steps=["], "override 'run.steps=[': not valid YAML"),
    ([*TRAIN, "run.steps=0"], "run.steps: Input should be greater than or equal to 1"),
    ([*TRAIN, "run.steps=true"], "run.steps: Value error, Input should be a number, not the boolean true"),
    ([*TRAIN, "run.steps=ten"], "run.steps: Input should be a valid integer"),
    ([*TRAIN, "run.seed=-1"], "run.seed: Input should be greater than or equal to 0"),
    ([*TRAIN, "run.resume=maybe"], "run.resume: Input should be 'auto' or 'never'"),
    ([*TRAIN, "optim.lr=.inf"], "optim.lr: Input should be a finite number"),
    ([*TRAIN, "optim.lr=-1"], "optim.lr: Input should be greater than 0"),
    ([*TRAIN, "optim.betas=[0.9]"], "optim.betas"),
    ([*TRAIN, "algorithm.name=ppo"], "algorithm.name: Input should be 'nft' or 'grpo'"),
    ([*TRAIN, "algorithm.group_size=1"], "algorithm.group_size: Input should be greater than or equal to 2"),
    ([*TRAIN, "sol.pool_size=1"], "sol.pool_size: Input should be greater than or equal to 2"),
    ([*TRAIN, "algorithm.pipeline_depth=2"], "algorithm.pipeline_depth: Input should be 0 or 1"),
    (
        [*TRAIN, "algorithm.pipeline_depth=1", "sol.enabled=false"],
        "algorithm.pipeline_depth 1 overlaps exploration with training: it needs sol.enabled true",
    ),
    ([*TRAIN, "cluster.placement=mixed"], "cluster.placement: Input should be 'split' or 'colocated'"),
    (
        [*TRAIN, "cluster.placement=colocated", "cluster.rollout_workers=2", "cluster.learners=1"],
        "cluster.rollout_workers == cluster.learners (got 2 and 1)",
    ),
    ([*TRAIN, "sol.keep_high_precision=['(']"], "'(' is not a regular expression"),
    ([*TRAIN, "sol.explore_precision=int4"], "sol.explore_precision"),
    ([*TRAIN, "cluster.zero_stage=3"], "cluster.zero_stage: Input should be 0, 1 or 2"),
    ([*TRAIN, "cluster.learners=0"], "cluster.learners: Input should be greater than or equal to 1"),
    ([*TRAIN, "model.family=unet"], "unknown model family 'unet'; valid: auto, tiny, sd3, flux, sana"),
    ([*TRAIN, "model.path={tmp}/no_model", "run.output_dir={tmp}/o"], "model path '{tmp}/no_model' is no local directory"),
    ([*TRAIN, "rewards.models=[]"], "rewards.models: List should have at least 1 item"),
    ([*TRAIN, "rewards.models=[{name: nope}]"], "unknown reward 'nope'; registered: "),
    ([*TRAIN, "rewards.models=[{name: 'no_such_module:Reward'}]"], "cannot load reward 'no_such_module:Reward': ModuleNotFoundError"),
    ([*TRAIN, "rewards.models=[{name: 'syntax_error_plugin:Broken'}]"], "cannot load reward 'syntax_error_plugin:Broken': SyntaxError"),
    ([*TRAIN, "rewards.models=[{name: 'raising_plugin:X'}]"], "RuntimeError: plugin import failed on purpose"),
    ([*TRAIN, "rewards.models=[{name: 'not_a_reward_plugin:NotAReward'}]"], "is the class NotAReward, not a rewards.Reward subclass"),
    ([*TRAIN, "rewards.models=[{name: brightness, weight: .nan}]"], "weight: Input should be a finite number"),
    ([*TRAIN, "rewards.models=[{name: brightness, wieght: 1}]"], "rewards.models.0.wieght: Extra inputs are not permitted"),
    ([*TRAIN, "eval.rewards=[nope]"], "eval.rewards: Value error, unknown reward 'nope'"),
    # prompt files
    (
        [*TRAIN, "run.prompts={tmp}/missing.txt", "run.output_dir={tmp}/o"],
        "prompt source '{tmp}/missing.txt' is neither 'tiny:train', 'tiny:eval', 'tiny:curriculum'",
    ),
    ([*TRAIN, "run.prompts={tmp}/empty.txt", "run.output_dir={tmp}/o"], "prompt file '{tmp}/empty.txt' holds no prompts"),
    ([*TRAIN, "run.prompts={tmp}/blank.txt", "run.output_dir={tmp}/o"], "prompt file '{tmp}/blank.txt' holds no prompts"),
    ([*TRAIN, "run.prompts={tmp}/binary.txt", "run.output_dir={tmp}/o"], "prompt file '{tmp}/binary.txt' is not UTF-8 text (byte 0"),
    ([*TRAIN, "run.prompts=tiny:holdout", "run.output_dir={tmp}/o"], "prompt source 'tiny:holdout' is neither"),
    ([*TRAIN, "eval.prompts={tmp}/empty.txt", "run.output_dir={tmp}/o"], "eval.prompts: prompt file"),
    ([*TRAIN, "eval.train_prompts={tmp}/missing.txt", "run.output_dir={tmp}/o"], "eval.train_prompts: prompt source"),
    # sample
    (["sample", "--prompt", "a red circle", "--out", "{tmp}/s", "--steps", "0"], "argument --steps: '0' is not >= 1"),
    (["sample", "--prompt", "a red circle", "--out", "{tmp}/s", "--steps", "many"], "argument --steps: 'many' is not an integer >= 1"),
    (["sample", "--prompt", "a red circle", "--out", "{tmp}/s", "--scale", "0"], "argument --scale: '0' is not >= 1"),
    (["sample", "--prompt", "a red circle", "--out", "{tmp}/s", "--seed", "5-2"], "the range 5-2 runs backwards"),
    (["sample", "--prompt", "a red circle", "--out", "{tmp}/s", "--seed", "0-999999999"], "more than 10000 seeds"),
    (["sample", "--prompt", "a red circle", "--out", "{tmp}/s", "--precision", "int4"], "argument --precision: invalid choice: 'int4'"),
    (["sample", "--prompt", "a red circle", "--out", "{tmp}/s", "--solver", "heun"], "argument --solver: invalid choice: 'heun'"),
    (["sample", "--prompt", "a red circle", "--out", "{tmp}/s", "--reward", "nope"], "--reward 'nope': unknown reward 'nope'"),
    (["sample", "--prompt", "a red circle", "--out", "{tmp}/s", "--model", "{tmp}/no_model"], "--model '{tmp}/no_model': "),
    (["sample", "--prompt", "a red circle", "--out", "{tmp}/s", "--lora", "{tmp}/lora_dir"], "holds no pytorch_lora_weights.safetensors"),
    (["sample", "--prompt", "a red circle", "--out", "{tmp}/s", "--lora", "{tmp}/missing"], "--lora '{tmp}/missing'"),
    (["sample", "--out", "{tmp}/s"], "the following arguments are required: --prompt"),
    (["sample", "--prompt", "a red circle"], "the following arguments are required: --out"),
    # eval
    (["eval", "--seeds-per-prompt", "0"], "argument --seeds-per-prompt: '0' is not >= 1"),
    (["eval", "--steps", "-3"], "argument --steps: '-3' is not >= 1"),
    (["eval", "--json", "{tmp}/no_dir/result.json"], "--json {tmp}/no_dir/result.json: the directory {tmp}/no_dir does not exist"),
    (["eval", "--lora", "{tmp}/lora_dir"], "holds no pytorch_lora_weights.safetensors"),
    # pretrain-tiny
    (["pretrain-tiny", "--out", "{tmp}/p", "--steps", "0"], "argument --steps: '0' is not >= 1"),
    (["pretrain-tiny", "--out", "{tmp}/p", "--batch-size", "0"], "argument --batch-size: '0' is not >= 1"),
    (["pretrain-tiny", "--out", "{tmp}/p", "--guidance", "0"], "argument --guidance: '0' is not > 0"),
    (["pretrain-tiny", "--out", "{tmp}/p", "--guidance", "nan"], "argument --guidance: 'nan' is not > 0"),
    (["pretrain-tiny", "--out", "{tmp}/p", "--lr", "0"], "argument --lr: '0' is not > 0"),
    (["pretrain-tiny", "--out", "{tmp}/p", "--save-every", "-1"], "argument --save-every: '-1' is not >= 0"),
    (["pretrain-tiny", "--out", "{tmp}/p", "--seed", "-1"], "argument --seed: '-1' is not >= 0"),
    (["pretrain-tiny", "--out", "{tmp}/p", "--task-weight", "two_object"], "bad task weight 'two_object'"),
    (["pretrain-tiny", "--out", "{tmp}/p", "--task-weight", "a=1", "--task-weight", "a=2"], "--task-weight a given twice (1 and 2)"),
    (["pretrain-tiny"], "the following arguments are required: --out"),
    # reward-server
    (["reward-server", "nope"], "reward 'nope': unknown reward 'nope'"),
    (["reward-server", "syntax_error_plugin:Broken"], "SyntaxError"),
    (["reward-server", "brightness", "--port", "99999"], "argument --port: '99999' is not >= 0 and <= 65535"),
    (["reward-server", "brightness", "--port", "-1"], "argument --port: '-1' is not >= 0 and <= 65535"),
    (["reward-server", "brightness", "--max-batch", "0"], "argument --max-batch: '0' is not >= 1"),
    (["reward-server", "brightness", "--max-request-mb", "-1"], "argument --max-request-mb: '-1' is not > 0"),
    (["reward-server", "brightness", "--batch-wait-ms", "-1"], "argument --batch-wait-ms: '-1' is not >= 0"),
    (["reward-server", "brightness", "--arg", "novalue"], "bad reward argument 'novalue'"),
    (["reward-server", "jpeg_compressibility", "--arg", "quality=1", "--arg", "quality=2"], "--arg quality given twice (1 and 2)"),
    (["reward-server", "jpeg_compressibility", "--arg", "colour=1"], "reward 'jpeg_compressibility': "),
    # the command itself
    (["fly"], "argument COMMAND: invalid choice: 'fly'"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    for name, text in PLUGINS.items():
        (tmp_path / name).write_text(text)
    for name, data in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_there_are_at_least_80_cases():
    assert len(CASES) >= 80


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(argv)[:60] for argv, _ in CASES])
def test_a_user_error_exits_2_with_one_message_naming_the_input(argv, message, user_files, capsys):
    tmp = str(user_files)
    with pytest.raises(SystemExit) as stopped:
        main([arg.replace("{tmp}", tmp) for arg in argv])
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert message.replace("{tmp}", tmp) in err and "Traceback" not in err
    assert not any((user_files / out).exists() for out in ("s", "p", "o"))  # refused before any work or output


def test_debug_shows_the_traceback_of_a_user_error(user_files):
    with pytest.raises(UsageError, match="unknown reward 'nope'") as raised:
        main(["--debug", "reward-server", "nope"])
    assert isinstance(raised.value.__cause__, ValueError)  # the traceback reaches where the name was looked up
