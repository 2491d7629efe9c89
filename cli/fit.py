"""`glm-mlx fit`: will the model fit this Mac, at what context, how fast - from a config alone."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from glm_mlx.model.config import ModelArgs
from glm_mlx.errors import ConfigError, GlmMlxError
from glm_mlx.model.glm_moe_dsa import set_kv_cache_bits
from glm_mlx.quantize.allocate import allocate
from glm_mlx.quantize.formats import make_format
from glm_mlx.quantize import compare as cmp
from glm_mlx.quantize.macs import GiB, Mac, MacError, custom_mac, get_mac, mac_names, parse_size, products
from glm_mlx.quantize.models import args_from_file, embedded_args, embedded_name, parse_models, smaller_that_fits
from glm_mlx.quantize.pipeline_plan import parse_macs
from glm_mlx.quantize.planner import Plan, PlanError, best_recipe_for, glm51_args, pipeline_size, plan, plan_pipeline
from glm_mlx.quantize.recipe import Recipe, default_recipe, recipe_from_quantization
from glm_mlx.quantize.serving import serving_plan
from glm_mlx.quantize.this_mac import ThisMac, detect

from .options import KvBits, ModelOpt, check_kv_bits, pick_model

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEFAULT_MAC = "m3-ultra-512"  # what fit plans for without --mac where this is not a Mac


class FitCommand(TyperCommand):
    """`--compare` alone means the default list of Macs: the parser gets `--compare=all` for it."""

    def parse_args(self, ctx, args):
        args = list(args)
        for i, a in enumerate(args):
            if a == "--":
                break
            if a == "--compare" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                args[i] = "--compare=all"
        return super().parse_args(ctx, args)


def with_kv_bits(args: ModelArgs, label: str, kv_bits: int | None) -> tuple[ModelArgs, str]:
    """The config priced with a --kv-bits cache (its bytes per token: codes + scales + biases + rope keys)."""
    if kv_bits:
        check_kv_bits(kv_bits)
        set_kv_cache_bits(args, kv_bits)
    return args, label


def load_model_args(model: str | None) -> tuple[ModelArgs, str]:
    """The config of an embedded GLM by name (glm-5.1, glm-5.3-flash), a local folder, a config.json, or a
    Hugging Face repo (config.json only); glm_moe_dsa and glm5_next configs alike."""
    if model is None:
        return glm51_args(), "GLM-5.1"
    path = Path(model).expanduser()
    if path.exists():
        return args_from_file(path), path.name if path.is_dir() else str(path)
    if embedded_name(model):
        return embedded_args(model)
    if not _REPO_RE.match(model):
        raise ConfigError(f"no model folder or config file at {model}",
                          "Pass a checkpoint folder, a config.json, or a Hugging Face repo id like zai-org/GLM-5.1.")
    try:
        from huggingface_hub import hf_hub_download

        return args_from_file(hf_hub_download(model, "config.json")), model
    except GlmMlxError:
        raise
    except Exception as e:  # noqa: BLE001 - hub/network errors of every kind become one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"could not fetch config.json of {model!r} from the Hugging Face Hub: {first}",
                          "Check the repo id and your network (set HF_TOKEN for gated repos), or pass a local folder.") from None


def _choose_recipe(args, mac, context, mtp, recipe_file, bits, mode, group_size, target_size, solve) -> Recipe:
    given = [n for n, v in (("--recipe", recipe_file), ("--bits/--mode/--group-size", bits or mode or group_size),
                            ("--target-size", target_size), ("--solve", solve)) if v]
    if len(given) > 1:
        raise GlmMlxError(f"{' and '.join(given)} each choose the recipe", "Pass only one of them.")
    if recipe_file:
        return Recipe.load(recipe_file)
    if bits or mode or group_size:
        return Recipe.uniform(make_format(mode or "affine", bits, group_size))
    if target_size:
        return allocate(args, parse_size(target_size), mtp, name=f"budget {target_size}")
    if solve:
        return best_recipe_for(args, mac, context, mtp)
    if args.quantization:  # an already-converted checkpoint: price what it holds
        return recipe_from_quantization(args.quantization)
    return default_recipe()


def fit(
    model: Optional[str] = typer.Argument(None, help="glm-5.1 or glm-5.3-flash (embedded configs), a Hugging Face repo id, local folder or config.json; with --compare also 'all' or a comma list [default: glm-5.1].", show_default=False),
    model_opt: ModelOpt = None,
    mac: Optional[str] = typer.Option(None, "--mac", help="Mac, e.g. m3-ultra-512, m3-max-96-30c, 'Mac Studio M3 Ultra 512GB'; 'list' shows all [default: this Mac on macOS, else m3-ultra-512]."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Custom Mac: unified memory as Apple labels it, e.g. 192GB."),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", help="Custom Mac: memory bandwidth in GB/s, e.g. 800."),
    context: Optional[int] = typer.Option(None, "--context", "-c", help="Context in tokens [default: max_position_embeddings]."),
    recipe_file: Optional[Path] = typer.Option(None, "--recipe", help="Recipe JSON (see --solve --out)."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Uniform recipe: bits (affine 2,3,4,5,6,8)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Uniform recipe: affine, mxfp4, nvfp4 or mxfp8."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Uniform recipe: group size (affine 32, 64, 128)."),
    target_size: Optional[str] = typer.Option(None, "--target-size", help="Mixed recipe priced at most this size, e.g. 361GB."),
    no_mtp: bool = typer.Option(False, "--no-mtp", help="Leave out the multi-token-prediction layer."),
    solve: bool = typer.Option(False, "--solve", help="Find the best recipe for this Mac at this context."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the recipe used (e.g. the solved one) to this JSON file."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", help="Also split over several Macs, e.g. m3-ultra-256,m3-ultra-256."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Serving: sequences decoded together [default: as many full-context caches as fit]."),
    compare: Optional[str] = typer.Option(None, "--compare", metavar="[MACS]", help="One table over Macs: per Mac the best recipe (as --solve) at --context [default: 32768], its size, bits/weight, max context, est. decode/prefill tok/s. Alone: every catalog Mac with >= 64 GB or where something fits; or a list, e.g. m3-ultra-512,m3-ultra-256,m4-max-128."),
    contexts: Optional[str] = typer.Option(None, "--contexts", help="With --compare: a column per context, e.g. 8K,32K,128K,max (K = 1024 tokens): the bits/weight of the best recipe at that context and its est. decode tok/s ('-': nothing fits)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw memory (weights, KV cache, working set) against context with the wired limits to this PNG, for --mac or the --compare Macs (needs glm-mlx[plot])."),
    kv_bits: KvBits = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report (with --compare: a list of rows)."),
):
    """Does the model fit this Mac, at what context, and how fast? Priced from config.json alone.

    Example: glm-mlx fit --mac m4-max-128 --context 32768 --solve
    """
    model = pick_model(model, model_opt)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 100)  # pipes: wide enough for the table
    if mac is not None and mac.strip().lower() == "list":
        _print_macs(Console(highlight=False, width=None if sys.stdout.isatty() else 160))
        return
    if compare is not None:
        given = [n for n, v in (("--mac", mac), ("--memory/--bandwidth", memory or bandwidth), ("--recipe", recipe_file),
                                ("--bits/--mode/--group-size", bits or mode or group_size), ("--target-size", target_size),
                                ("--solve", solve), ("--out", out), ("--pipeline", pipeline), ("--max-batch", max_batch)) if v]
        if given:
            raise GlmMlxError(f"--compare solves the best recipe for each Mac; {', '.join(given)} do not apply to it",
                              "Drop them, or compare Macs by name: --compare m3-ultra-512,m4-max-128.")
        if model and ("," in model or model.strip().lower() == "all"):
            if contexts:
                raise GlmMlxError("--contexts adds columns for one model", "Compare several models at one --context.")
            _compare_models(parse_models(model), compare, context, not no_mtp, kv_bits, as_json)
            return
        args, label = with_kv_bits(*load_model_args(model), kv_bits)
        _compare(args, label, compare, context, contexts, not no_mtp, plot, as_json)
        return
    if contexts:
        raise GlmMlxError("--contexts adds columns to the --compare table", "Add --compare (alone: the catalog).")
    args, label = with_kv_bits(*load_model_args(model), kv_bits)
    the_mac, here = _pick_mac(mac, memory, bandwidth, model)
    mtp = not no_mtp
    n_ctx = args.max_position_embeddings if context is None else context
    try:
        recipe = _choose_recipe(args, the_mac, n_ctx, mtp, recipe_file, bits, mode, group_size, target_size, solve)
    except PlanError as e:  # --solve found nothing: say which GLM this Mac holds instead
        alt = smaller_that_fits(args, the_mac, n_ctx, mtp)
        raise PlanError(str(e), f"{label} does not fit this Mac; {alt.label} does: {alt.command}" if alt else e.hint) from None
    p = plan(args, recipe, the_mac, n_ctx, mtp=mtp, model=label)
    alt = smaller_that_fits(args, the_mac, n_ctx, mtp) if p.fits == "no" and not pipeline else None
    pipe = plan_pipeline(args, recipe, parse_macs(pipeline), n_ctx, mtp) if pipeline else None
    # When one Mac cannot hold it: how many of this Mac a pipeline needs (0: more than 8).
    needed = pipeline_size(args, the_mac, n_ctx, mtp, recipe) if p.fits == "no" and not pipe else None
    serving = serving_plan(p, max_batch) if p.fits != "no" else None
    if out:
        recipe.save(out)
    plotted = _plot([cmp.memory_curve(args, recipe, the_mac, mtp)], plot, label, as_json) if plot else None
    if as_json:
        d = p.to_dict()
        if here is not None:
            d["this_mac"] = here.to_dict()
        if serving:
            d["serving"] = serving.to_dict()
        if pipe:
            d["pipeline"] = _pipeline_dict(pipe)
        if needed is not None:
            d["pipeline_macs_needed"] = needed
        if alt:
            d["smaller_model_fits"] = alt.to_dict()
        typer.echo(json.dumps(d))
        return
    if here is not None:
        _print_here(console, here, p)
    _print_plan(console, p, needed, serving, alt)
    if pipe:
        _print_pipeline(console, pipe)
    if out:
        console.print(f"Recipe written to {out}")
    if plotted:
        console.print(f"Plot written to {plotted}")


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def _print_plan(c: Console, p: Plan, pipeline_macs: int | None = None, serving=None, alt=None) -> None:
    c.print(f"[bold]{p.model or 'model'}[/] on [bold]{p.mac.label}[/] at {p.context:,} tokens"
            f"{'' if p.mtp else ', no MTP'}")
    c.print(f"Recipe: {p.recipe.name or p.recipe.default.name} ({p.params / 1e9:,.1f}B parameters, "
            f"{8 * p.weights_bytes / p.params:.2f} bits/weight)")
    t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    t.add_column("Memory", no_wrap=True)
    t.add_column("", justify="right", no_wrap=True)
    for comp, b in sorted(p.weights_by_component.items(), key=lambda kv: -kv[1]):
        t.add_row(f"  weights: {comp}", gb(b))
    t.add_row("[bold]Weights[/]", f"[bold]{gb(p.weights_bytes)}[/]")
    rows = (p.kv_bytes - p.state_bytes) // p.kv_bytes_per_token
    t.add_row(f"KV cache ({p.kv_bytes_per_token:,} B/token x {rows:,}"
              + (f" + {p.state_bytes / 1e6:,.0f} MB KDA state)" if p.state_bytes else ")"), gb(p.kv_bytes))
    t.add_row(f"Working set (prefill chunk {min(p.prefill_chunk, p.context):,})", gb(p.working_set_bytes))
    t.add_row("[bold]Total to wire[/]", f"[bold]{gb(p.total_bytes)}[/]")
    raised = p.mac.wired_limit_mb
    t.add_row(f"GPU wired limit ({f'raised: iogpu.wired_limit_mb={raised}' if raised else 'macOS default'})",
              gb(p.wired_limit_bytes))
    t.add_row(f"Raised limit (RAM - {p.os_allowance_bytes / GiB:.0f} GiB for macOS + apps)", gb(p.max_wired_limit_bytes))
    c.print(t)
    if p.fits == "yes":
        c.print(f"[bold green]Fits[/] within {'this Mac' + chr(39) + 's raised' if raised else 'the default'} GPU wired limit.")
    elif p.fits == "raise-wired-limit":
        c.print(f"[bold yellow]Fits after raising the GPU wired limit:[/] {p.sysctl}")
    else:
        c.print(f"[bold red]Does not fit[/] ({gb(p.total_bytes - p.max_wired_limit_bytes)} over). "
                "Try --solve, a smaller --context, or --pipeline.")
        if pipeline_macs:
            c.print(f"A pipeline over {pipeline_macs} x {p.mac.name} holds it: "
                    f"--pipeline {','.join([p.mac.name] * pipeline_macs)}")
        if alt:  # a smaller GLM that this Mac holds (quantize/models.py)
            c.print(f"[bold]{p.model} does not fit this Mac; {alt.label} does[/] ({8 * alt.plan.weights_bytes / alt.plan.params:.2f}"
                    f" bits/weight at {alt.plan.context:,} tokens, est. {alt.plan.decode_tok_s:.1f} tok/s): {alt.command}",
                    soft_wrap=True)
    c.print(f"Max context: {p.max_context:,} tokens (default limit: {p.max_context_default_limit:,})")
    c.print(f"Est. decode{' if it fit' if p.fits == 'no' else ''}: {p.decode_tok_s:.1f} tok/s at {p.context:,} "
            f"tokens ({p.decode_tok_s_1k:.1f} at 1K); prefill: {p.prefill_tok_s:.0f} tok/s over {p.context:,} "
            f"({p.prefill_tok_s_1k:.0f} at 1K)")
    if serving:
        c.print(f"Serving (glm-mlx serve): {serving.max_batch} sequence{'s' if serving.max_batch > 1 else ''} of "
                f"{p.context:,} tokens decode together ({gb(serving.batch_kv_bytes)} of KV cache); prefix cache "
                f"in RAM beside them: {gb(serving.prefix_cache_bytes)} = {serving.prefix_cache_tokens:,} tokens")
    for rule in p.unused_rules:
        c.print(f"[yellow]Recipe rule {json.dumps(rule)} matches no weight of this model.[/]")
    if p.kept_unquantized:
        first = next(iter(p.kept_unquantized.items()))
        c.print(f"[dim]{len(p.kept_unquantized)} weights stay unquantized, e.g. {first[0]}: {first[1]}[/]")
    c.print("[dim]Assumptions:[/]")
    for a in p.assumptions:
        c.print(f"[dim]  - {a}[/]")


def _pipeline_dict(pp) -> dict:
    return {"fits": pp.fits, "link_bytes_per_token": pp.link_bytes_per_token, "decode_tok_s": pp.decode_tok_s,
            "stages": [{"mac": s.mac.name, "layers": list(s.layers), "weights_bytes": s.weights_bytes,
                        "kv_bytes": s.kv_bytes, "working_set_bytes": s.working_set_bytes,
                        "total_bytes": s.total_bytes, "fits": s.fits} for s in pp.stages]}


def _print_pipeline(c: Console, pp) -> None:
    t = Table(title=f"Pipeline over {len(pp.stages)} Macs", header_style="bold", box=None)
    for col in ("rank", "Mac", "layers", "weights", "KV", "total", "fits"):
        t.add_column(col, justify="right" if col in ("weights", "KV", "total") else "left", no_wrap=True)
    for i, s in enumerate(pp.stages):
        t.add_row(str(i), s.mac.name, f"{s.layers[0]}-{s.layers[1]}", gb(s.weights_bytes), gb(s.kv_bytes), gb(s.total_bytes), s.fits)
    c.print(t)
    c.print(f"Link traffic: {pp.link_bytes_per_token:,} bytes per token; est. decode {pp.decode_tok_s:.1f} tok/s")


def _print_macs(c: Console) -> None:
    t = Table(header_style="bold", box=None)
    for col in ("name", "memory", "bandwidth", "GPU", "default wired limit", "sold in"):
        t.add_column(col, no_wrap=True)
    for name in mac_names():
        m = get_mac(name)
        t.add_row(name, f"{m.memory_gb:g} GB", f"{m.bandwidth_gbs:g} GB/s", f"{m.gpu_cores}-core",
                  f"{m.default_wired_limit / GiB:.1f} GiB", ", ".join(products(m.chip)))
    c.print(t)
    c.print("Product names work too, e.g. --mac 'Mac Studio M3 Ultra 512GB' or 'MacBook Pro M4 Max 128GB'.")


# --- this Mac ------------------------------------------------------------------------------------
def _pick_mac(mac: str | None, memory, bandwidth, model: str | None) -> tuple[Mac, ThisMac | None]:
    """The Mac to plan for, and what detection found when none was named (None: one was named)."""
    if memory is not None or bandwidth is not None:
        if memory is None or bandwidth is None:
            raise MacError("a custom Mac needs both --memory and --bandwidth", "e.g. --memory 192GB --bandwidth 800")
        return custom_mac(parse_size(memory, binary_gb=True) / GiB, bandwidth), None
    if mac is not None:
        return get_mac(mac), None
    here = detect(folder=_model_folder(model))
    return (here.mac if here.is_mac else get_mac(DEFAULT_MAC)), here


def _model_folder(model: str | None) -> Path:
    """Where the weights are or will go: a local --model's folder, else the Hugging Face cache."""
    path = Path(model).expanduser() if model else None
    if path is not None and path.exists():
        return path if path.is_dir() else path.parent
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:
        return Path.home() / ".cache" / "huggingface" / "hub"


def _print_here(c: Console, here: ThisMac, p: Plan) -> None:
    if not here.is_mac:
        c.print(f"Planning for the default catalog Mac {DEFAULT_MAC}: this is not a Mac ({here.system}); "
                "pass --mac to plan for another.", soft_wrap=True)
        return
    m = here.mac
    how = f"raised: iogpu.wired_limit_mb={m.wired_limit_mb}" if m.wired_limit_mb else "macOS default"
    c.print(f"Planning for this Mac: {m.label}, wired limit {m.wired_limit / GiB:.1f} GiB ({how})", soft_wrap=True)
    if here.free_disk_bytes is not None:
        there = any(Path(here.disk_path).glob("*.safetensors"))
        short = not there and here.free_disk_bytes < p.weights_bytes
        c.print(f"Disk: {gb(here.free_disk_bytes)} free at {here.disk_path}"
                + (f" [yellow](less than the {gb(p.weights_bytes)} of weights)[/]" if short else ""), soft_wrap=True)


# --- several Macs ---------------------------------------------------------------------------------
def _compare(args, label: str, which: str, context, contexts, mtp: bool, plot, as_json: bool) -> None:
    macs = None if which.strip().lower() in ("", "all") else cmp.parse_mac_list(which)
    ctxs = cmp.parse_contexts(contexts, args.max_position_embeddings)
    rows = cmp.compare(args, macs, context, ctxs, mtp, label)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    plotted = _plot(cmp.plot_curves(args, rows, mtp, unfit=macs is not None), plot, label, as_json) if plot else None
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows]))
        return
    _print_compare(console, label, rows, ctxs, cmp.smallest_weights(args, mtp), args.max_position_embeddings)
    if plotted:
        console.print(f"Plot written to {plotted}")


def _compare_models(keys: list[str], which: str, context, mtp: bool, kv_bits, as_json: bool) -> None:
    """--compare over several GLMs (--model all): per Mac, each model's best recipe at --context."""
    models = [(k, *with_kv_bits(*load_model_args(k), kv_bits)) for k in keys]
    macs = None if which.strip().lower() in ("", "all") else cmp.parse_mac_list(which)
    table = cmp.compare_models(models, macs, context, mtp=mtp)
    if as_json:
        typer.echo(json.dumps([{"model": k, **r.to_dict()} for rows in table.values() for k, r in rows.items()]))
        return
    c = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    ctx = next(iter(next(iter(table.values())).values())).best.context
    c.print(f"[bold]{' vs '.join(label for _, _, label in models)}[/]: the best recipe per Mac at {ctx:,} tokens "
            "(bits/weight, max context, est. decode tok/s; '-': does not fit)")
    t = Table(header_style="bold", box=None, pad_edge=False)
    t.add_column("Mac", no_wrap=True)
    t.add_column("GB/s", justify="right")
    for _, _, label in models:
        t.add_column(label, justify="right", no_wrap=True)
    for rows in table.values():
        r0 = next(iter(rows.values()))
        cells = [f"{r.best.bits_per_weight:.2f} bpw, {r.best.plan.max_context:,}, {r.best.plan.decode_tok_s:.1f}/s"
                 + ("" if r.best.fits == "yes" else " (raise)") if r.best.plan else "-" for r in rows.values()]
        t.add_row(r0.mac.name, f"{r0.mac.bandwidth_gbs:g}", *cells)
    c.print(t)
    c.print("[dim](raise): raise the GPU wired limit first; glm-mlx fit --model NAME --mac MAC --solve prints the sysctl.[/]")


def _print_compare(c: Console, label: str, rows: list, ctxs: list, floor: int, top: int) -> None:
    c.print(f"[bold]{label}[/]: the best recipe per Mac at {rows[0].best.context:,} tokens")
    fit = [r for r in rows if r.fits_somewhere]
    t = Table(header_style="bold", box=None, pad_edge=False)
    for col in ("Mac", "GB/s", "recipe", "weights", "bits/w", "max context", "decode tok/s", "prefill tok/s", "limit",
                *(lab for lab, _ in ctxs)):
        t.add_column(col, justify="left" if col in ("Mac", "recipe", "limit") else "right", no_wrap=True)
    for r in fit:
        b, p = r.best, r.best.plan
        main = ([b.kind, gb(p.weights_bytes), f"{b.bits_per_weight:.2f}", f"{p.max_context:,}", f"{p.decode_tok_s:.1f}",
                 f"{p.prefill_tok_s:.0f}", "default" if b.fits == "yes" else "raise"] if p else ["does not fit"] + ["-"] * 6)
        cells = [f"{s.bits_per_weight:.2f} bpw {s.plan.decode_tok_s:.1f}/s" if s.plan else "-" for s in r.contexts]
        t.add_row(r.mac.name, f"{r.mac.bandwidth_gbs:g}", *main, *cells)
    if fit:
        c.print(t)
    rest = [r for r in rows if not r.fits_somewhere]
    if rest:
        c.print(f"Nothing fits on {', '.join(r.mac.name for r in rest)}: the smallest recipe needs {gb(floor)} of weights; "
                f"these Macs have at most {gb(max(r.weights_budget_bytes for r in rest))} for weights at "
                f"{rest[0].best.context:,} tokens.", soft_wrap=True)
        if embedded_name(label) == "glm-5.1":
            c.print(f"{label} does not fit these Macs; GLM-5.3-Flash (321B, ~18B active) may: "
                    "glm-mlx fit --compare --model all", soft_wrap=True)
    c.print("[dim]Recipes fill RAM minus the OS reserve; limit 'raise': raise the GPU wired limit first (glm-mlx fit "
            "--mac NAME --solve --context N prints the sysctl)."
            + (" Per context: bits/weight of the best recipe there and est. decode tok/s." if ctxs else "")
            + "".join(f" {lab} is planned at the model's maximum, {top:,} tokens." for lab, n in ctxs if n == top) + "[/]",
            soft_wrap=True)


def _plot(curves: list[dict], path: Path, label: str, as_json: bool) -> Path:
    """Draw the PNG; with --json say so on stderr (stdout holds only the JSON), else the caller says it last."""
    from glm_mlx.quantize.fit_plot import plot_memory

    out = plot_memory(curves, path, f"{label}: memory against context")
    if as_json:
        typer.echo(f"Plot written to {out}", err=True)
    return out
