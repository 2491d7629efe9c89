"""Option types shared by the commands (huggingface_hub CLI style), the one table of option ranges (RANGES,
checked for every command by the app's group), and model resolution."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import List, NamedTuple, Optional

import typer
from typing_extensions import Annotated

from glm_mlx.errors import GlmMlxError

ModelArg = Annotated[Optional[str], typer.Argument(
    help="Checkpoint folder or downloaded repo id. [default: the built-in reference model]", show_default=False)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-m", help="Most tokens to generate.")]
Temp = Annotated[float, typer.Option("--temp", help="Sampling temperature; 0 = greedy.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")]
MinP = Annotated[float, typer.Option("--min-p", help="Minimum probability relative to the top token.")]
TopK = Annotated[int, typer.Option("--top-k", help="Sample among the k most likely tokens (0 = all).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed for reproducible sampling.")]
NoMtp = Annotated[bool, typer.Option("--no-mtp", help="Decode without the MTP draft layer.")]
NumDraft = Annotated[int, typer.Option("--num-draft", "--num-draft-tokens",
                                       help="Tokens drafted by the MTP layer per step.")]
Stop = Annotated[Optional[List[str]], typer.Option("--stop", help="Stop string (repeatable).")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
# mlx-lm's spellings (mlx_lm.generate / chat / server / benchmark), shared by the commands that run a model.
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="The same as the MODEL argument (mlx-lm's spelling); give one or the other.", show_default=False)]
SystemPrompt = Annotated[Optional[str], typer.Option("--system-prompt", "--system", help="System message.")]
PrefillStep = Annotated[int, typer.Option("--prefill-step-size", "--prefill-step",
                                          help="Prompt tokens per prefill chunk (peak memory grows with it).")]
TemplateArgs = Annotated[Optional[str], typer.Option(
    "--chat-template-args", "--chat-template-config",
    help='JSON keyword arguments for the chat template, e.g. \'{"enable_thinking": false}\'.', show_default=False)]
ExtraEos = Annotated[Optional[List[str]], typer.Option(
    "--extra-eos-token", help="A token (as the vocabulary spells it, or its id) that ends generation like eos "
    "(repeatable).", show_default=False)]
PromptCacheFile = Annotated[Optional[str], typer.Option(
    "--prompt-cache-file", help="Prompt cache (safetensors): loaded if it exists, its tokens reused where the prompt "
    "starts the same, and written back when done.", show_default=False)]
KvBits = Annotated[Optional[int], typer.Option(
    "--kv-bits", help="Store the KV cache's latents as 8- or 4-bit codes (a scale and bias per 64 values; rope and "
    "indexer keys stay as they are): GLM-5.1's cache takes 0.66x (8) or 0.48x (4) the bytes, so longer contexts "
    "fit. Default: the model dtype.", show_default=False)]


class Range(NamedTuple):
    """The values an option takes. NaN and infinities never pass; `size`: a size string like 5GB, checked
    as bytes."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # True: the value must be > lo, not >= lo
    size: bool = False

    def describe(self) -> str:
        bounds = [f"{'>' if self.lo_open else '>='} {_num(self.lo)}"] if self.lo is not None else []
        return " and ".join(bounds + ([f"<= {_num(self.hi)}"] if self.hi is not None else []))

    def admits(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):  # NaN passes no comparison: reject it by name
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# THE table: every numeric (and size) option of every command, by option name. The app's command group
# applies it to each command (`install`), and tests/test_cli_options.py fails for an option missing here.
RANGES: dict[str, Range] = {
    "--max-tokens": Range(1),
    "--temp": Range(0),
    "--top-p": Range(0, 1, lo_open=True),
    "--min-p": Range(0, 1),
    "--top-k": Range(0),  # 0 = all tokens
    "--seed": Range(0, 2**64 - 1),  # what mx.random.key takes
    "--num-draft-tokens": Range(1, 16),  # past a few drafts the last one is almost never accepted
    "--context": Range(1),
    "--prompt-tokens": Range(1),
    "--generation-tokens": Range(1),
    "--window": Range(2),  # a one-token window predicts nothing
    "--calibration-tokens": Range(1),
    "--port": Range(0, 65535),  # 0 = any free port
    "--prefill-step-size": Range(16),
    "--prefill-budget": Range(16),
    "--cache-slots": Range(1, 64),
    "--max-queue": Range(1),
    "--max-batch": Range(1, 256),
    "--cache-block": Range(2, 65536),
    "--kv-bits": Range(4, 8),  # then check_kv_bits: 4 or 8
    "--bits": Range(2, 8),  # make_format then checks the mode's exact values
    "--group-size": Range(16, 128),
    "--q-bits": Range(2, 8),  # convert: mlx-lm's spelling of --bits
    "--q-group-size": Range(16, 128),  # convert: mlx-lm's spelling of --group-size
    "--max-workers": Range(1, 64),  # download: files fetched at once
    "--bandwidth": Range(0, lo_open=True),
    "-n": Range(1),
    "--memory": Range(0, lo_open=True, size=True),
    "--target-size": Range(0, lo_open=True, size=True),
    "--shard-size": Range(0, lo_open=True, size=True),
    "--cache-memory": Range(0, lo_open=True, size=True),
    "--cache-disk": Range(0, size=True),  # 0 turns the SSD tier off
    "--keepalive": Range(0, lo_open=True),  # serve: seconds
    "--max-connections": Range(1),
    "--header-timeout": Range(0, lo_open=True),
    "--body-timeout": Range(0, lo_open=True),
    "--idle-timeout": Range(0, lo_open=True),
    "--shutdown-timeout": Range(0),
}


class OptionRangeError(GlmMlxError):
    pass


def option_name(param) -> str:
    """The name the table uses: the longest spelling (--max-tokens, not -m)."""
    return max(param.opts, key=len) if param.opts else param.name


def check_option(name: str, value, command: str) -> None:
    """Raise OptionRangeError unless `value` is within RANGES[name]."""
    rng, hint = RANGES[name], f"glm-mlx {command} --help describes {name}."
    if rng.size:
        from glm_mlx.quantize.macs import parse_size

        try:
            number = parse_size(value)
        except GlmMlxError:
            raise OptionRangeError(f"{name} must be a size like 5GB, 336.6GiB or 192 (got {value!r})", hint) from None
        if not rng.admits(number):
            raise OptionRangeError(f"{name} must be a size {rng.describe()} (got {value!r})", hint)
    elif not rng.admits(value):
        raise OptionRangeError(f"{name} must be {rng.describe()} (got {value})", hint)


def install(commands: dict) -> None:
    """Prepare the app's commands (called by its group, so every command shares it): check the table's
    options before the command runs, and escape help text so Rich shows a literal `[default: ...]`
    instead of taking it for markup."""
    from rich.markup import escape

    for command, cmd in commands.items():
        if getattr(cmd, "glm_mlx_prepared", False):  # escaping twice would show the backslashes
            continue
        cmd.glm_mlx_prepared = True
        checked = {p.name: option_name(p) for p in cmd.params if option_name(p) in RANGES}
        for p in cmd.params:
            if p.name in checked:  # the help says what the check allows
                rng = RANGES[checked[p.name]]
                p.help = f"{p.help or ''} [range: {'a size ' if rng.size else ''}{rng.describe()}]".strip()
        for obj in (cmd, *cmd.params):
            if getattr(obj, "help", None):
                obj.help = escape(obj.help)
        if checked and cmd.callback is not None:
            cmd.callback = _checking(cmd.callback, command, checked)


def _checking(callback, command: str, checked: dict):
    @functools.wraps(callback)
    def run(**kwargs):
        for key, name in checked.items():
            if kwargs.get(key) is not None:  # None: the option was not given and has no default
                check_option(name, kwargs[key], command)
        return callback(**kwargs)

    return run


class NoModelError(GlmMlxError):
    hint = "Pass a checkpoint folder, e.g. glm-mlx chat ./GLM-5.1-mlx-4bit (glm-mlx download / convert make one)."


def resolve_model(model: str | None) -> str:
    """The model argument, or the built-in reference model when none is given."""
    if model:
        return model
    try:
        from glm_mlx.model.reference import DEFAULT_MODEL
    except ImportError:
        DEFAULT_MODEL = None
    if DEFAULT_MODEL is None or not Path(DEFAULT_MODEL).exists():
        raise NoModelError("no MODEL given and the built-in reference model is not installed")
    return str(DEFAULT_MODEL)


class FlagError(GlmMlxError):
    pass


def pick_model(positional: str | None, option: str | None) -> str | None:
    """The one way every model-running command reads its model: the MODEL argument or `--model` (mlx-lm's
    spelling). Both given naming different models is an error; neither: None (the command's default)."""
    if positional and option and not _same_model(positional, option):
        raise FlagError(f"MODEL {positional!r} and --model {option!r} name different models",
                        "Give the model once, as MODEL or as --model.")
    return positional or option


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def parse_template_args(text: str | None, flag: str = "--chat-template-args") -> dict:
    """--chat-template-args: a JSON object of keyword arguments for the chat template ({} when not given)."""
    if not text:
        return {}
    hint = f"""Pass a JSON object, e.g. {flag} '{{"enable_thinking": false}}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FlagError(f"{flag} is not valid JSON: {e}", hint) from None
    if not isinstance(value, dict):
        raise FlagError(f"{flag} must be a JSON object, not {type(value).__name__}", hint)
    return value


def add_extra_eos(tokenizer, tokens: list[str] | None) -> list[int]:
    """--extra-eos-token: make each token end generation like eos (TextStream reads tokenizer.eos_token_ids).
    A token is an integer id (as mlx-lm reads it), a vocabulary entry, or text that encodes to one token."""
    ids = []
    for t in tokens or []:
        if t.strip().isdigit():
            i = int(t)
        else:
            i = tokenizer.convert_tokens_to_ids(t)
            if i is None or (i == getattr(tokenizer, "unk_token_id", None) and t != getattr(tokenizer, "unk_token", None)):
                encoded = list(tokenizer.encode(t, add_special_tokens=False))
                i = encoded[0] if len(encoded) == 1 else None
        if i is None or not 0 <= i < len(tokenizer):
            raise FlagError(f"--extra-eos-token {t!r} is not one token of this tokenizer",
                            "Pass a single token (or its id); --stop ends generation at a string of several tokens.")
        ids.append(i)
    if ids:
        tokenizer.eos_token_ids = set(tokenizer.eos_token_ids or ()) | set(ids)
    return ids


def distributed_group():
    """The mx.distributed group when started by mlx.launch with more than one rank, else None."""
    import os

    if "MLX_RANK" not in os.environ:
        return None
    import mlx.core as mx

    group = mx.distributed.init()
    return group if group.size() > 1 else None


def check_kv_bits(kv_bits: int | None) -> None:
    """--kv-bits is 4 or 8 (or not given)."""
    from glm_mlx.model.config import KV_CACHE_BITS

    if kv_bits not in KV_CACHE_BITS:
        raise OptionRangeError(f"--kv-bits must be 8 or 4 (got {kv_bits})", "Leave it out for an unquantized cache.")


def load_for_generation(model: str | None, context: int = 8192, mtp: bool = True, kv_bits: int | None = None):
    """(model, tokenizer, path): resolve, check memory before loading, load, wire memory.

    Under `glm-mlx launch` each rank loads only its layers; ranks other than 0 then follow rank 0's
    requests silently and exit when it does, so only rank 0 talks to the user.
    """
    import atexit

    from rich.console import Console

    from glm_mlx import load
    from glm_mlx.memory import check_memory, set_wired_limit
    from glm_mlx.model.checkpoint import Checkpoint
    from glm_mlx.model.config import ModelArgs

    check_kv_bits(kv_bits)
    ckpt = Checkpoint.open(resolve_model(model))  # resolved, its config read and its files listed: once
    path = ckpt.path
    group = distributed_group()
    if group is not None:
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        from glm_mlx.distributed.pipeline import follow, pipeline_load

        ranges, stage = _planned_split(ckpt, group, mtp)
        pm, path = pipeline_load(ckpt, group, ranges=ranges, mtp=mtp)
        # Each rank says what it holds beside what the plan priced, so the two can be checked.
        Console(stderr=True, highlight=False).print(
            f"pipeline rank {group.rank()}/{group.size()} on {stage.mac.label}: layers {stage.layers[0]}-{stage.layers[1]}, "
            f"weights {pm.resident_bytes} bytes (planned {stage.weights_bytes})", soft_wrap=True)
        if kv_bits:
            pm.set_kv_cache_bits(kv_bits)
        if group.rank() != 0:
            follow(pm)
            raise typer.Exit(0)
        atexit.register(pm.close)
        return pm, load_tokenizer(path, eos_token_ids=pm.args.eos_token_ids or None), path
    args = ModelArgs.from_dict({**ckpt.config, "kv_cache_bits": kv_bits}) if kv_bits else ckpt.args
    check = check_memory(path, args, context, mtp=mtp)
    if not check.fits:
        Console(stderr=True).print(f"[yellow]Warning:[/] {check.message}", soft_wrap=True)
    m, tok = load(ckpt, mtp=mtp)
    if kv_bits:
        m.set_kv_cache_bits(kv_bits)
    if mtp and not m.has_mtp:
        Console(stderr=True).print("[dim]MTP off: this checkpoint has no MTP layer.[/]")
    set_wired_limit(check)
    return m, tok, path


def _planned_split(ckpt, group, mtp: bool):
    """([start, end) per rank, this rank's planned stage): the planner's split for this pipeline's Macs,
    i.e. what `glm-mlx fit --model M --pipeline A,B` prints."""
    from glm_mlx.quantize.pipeline_plan import context_from_env, launch_plan, layer_ranges, rank_macs

    plan = launch_plan(ckpt, rank_macs(group), context_from_env(), mtp)
    return layer_ranges(plan), plan.stages[group.rank()]
