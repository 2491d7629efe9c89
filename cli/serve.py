"""`glm-mlx serve`: OpenAI (/v1/chat/completions, /v1/completions) and Anthropic (/v1/messages) APIs
for coding agents and chat UIs, with tool calls and reasoning."""

from __future__ import annotations

import json
import logging
from typing import Optional

import typer
from rich.console import Console
from typing_extensions import Annotated

from glm_mlx.errors import GlmMlxError

from .serve_access import (AllowedHost, AllowedOrigins, ApiKey, ApiKeyFile, BodyTimeout, HeaderTimeout,
                           IdleTimeout, LogFormat, MaxConnections, NoAuth, ShutdownTimeout, is_loopback, policy,
                           read_keys)
from .options import (KvBits, ModelArg, ModelOpt, NoMtp, NumDraft, check_kv_bits, load_for_generation,
                      parse_template_args, pick_model)

Host = Annotated[str, typer.Option("--host", help="Address to bind; keep 127.0.0.1 unless you mean to share it.")]
Port = Annotated[int, typer.Option("--port", help="TCP port (0: any free port).")]
Context = Annotated[Optional[int], typer.Option(
    "--context", help="Most prompt + completion tokens per request. Default: the model's context, capped by "
    "what fits in GPU memory beside the weights.", show_default=False)]
ServeMaxTokens = Annotated[int, typer.Option("--max-tokens", help="Completion tokens when a request sets no "
                                             "max_tokens (cut to what the context leaves).")]
Reasoning = Annotated[bool, typer.Option("--reasoning/--no-reasoning", help="Think before answering when a request "
                                         "does not say (chat_template_kwargs.enable_thinking, Anthropic thinking).")]
TemplateArgs = Annotated[Optional[str], typer.Option(
    "--chat-template-args", help='JSON defaults for chat_template_kwargs, e.g. \'{"enable_thinking": false}\'.',
    show_default=False)]
PrefillStep = Annotated[int, typer.Option("--prefill-step-size", "--prefill-step", help="Prompt tokens per prefill chunk (a "
                                          "cancelled request stops within one chunk).")]
PrefillBudget = Annotated[int, typer.Option("--prefill-budget", help="Prompt tokens prefilled per step while "
                                            "other requests decode (their streams wait that long per token).")]
CacheSlots = Annotated[int, typer.Option("--cache-slots", help="Conversations whose prompt cache is "
                                         "kept in memory.")]
MaxQueue = Annotated[int, typer.Option("--max-queue", help="Requests that may wait; more get HTTP 503.")]
MaxBatch = Annotated[Optional[int], typer.Option(
    "--max-batch", help="Sequences decoded together (continuous batching). Default: how many "
    "full-context caches fit beside the weights in GPU memory, at most 8 (8 where the backend does not say).",
    show_default=False)]
CacheDir = Annotated[Optional[str], typer.Option(
    "--cache-dir", help="SSD tier of the prefix cache (blocks as safetensors files; survives restarts). Default: "
    "~/.cache/glm-mlx/prefix (macOS: ~/Library/Caches/glm-mlx/prefix).", show_default=False)]
CacheMemory = Annotated[Optional[str], typer.Option(
    "--cache-memory", help="RAM tier of the prefix cache, e.g. 32GB. Default: what the memory plan leaves beside the "
    "weights and the batch's caches (2GB where the backend does not say).", show_default=False)]
CacheDisk = Annotated[str, typer.Option("--cache-disk", help="SSD tier size; least recently used blocks go first; 0 turns the SSD tier off.")]
CacheBlock = Annotated[int, typer.Option("--cache-block", help="Tokens per prefix-cache block.")]
NoPrefixCache = Annotated[bool, typer.Option("--no-prefix-cache", help="Keep only the live conversations' caches.")]
Keepalive = Annotated[float, typer.Option("--keepalive", help="Seconds without output before a stream sends a "
                                          "keep-alive (a long prefill), so clients' idle timeouts do not fire.")]
LogLevel = Annotated[str, typer.Option("--log-level", help="warning, info or debug (debug: each ignored request "
                                       "field, once).")]


class ServeError(GlmMlxError):
    hint = "Check the option; glm-mlx serve --help lists them."


def _template_args(text: str | None) -> dict:
    return parse_template_args(text)  # the one parser generate, chat and serve share


def serve(
    model: ModelArg = None, model_opt: ModelOpt = None, host: Host = "127.0.0.1", port: Port = 8080, context: Context = None,
    max_tokens: ServeMaxTokens = 8192, reasoning: Reasoning = True, chat_template_args: TemplateArgs = None,
    no_mtp: NoMtp = False, num_draft: NumDraft = 1, prefill_step: PrefillStep = 2048,
    prefill_budget: PrefillBudget = 512, cache_slots: CacheSlots = 4,
    max_queue: MaxQueue = 64, max_batch: MaxBatch = None, cache_dir: CacheDir = None, cache_memory: CacheMemory = None,
    cache_disk: CacheDisk = "64GB", cache_block: CacheBlock = 256, no_prefix_cache: NoPrefixCache = False,
    kv_bits: KvBits = None, keepalive: Keepalive = 5.0, log_level: LogLevel = "warning",
    api_key: ApiKey = None, api_key_file: ApiKeyFile = None, no_auth: NoAuth = False,
    allowed_host: AllowedHost = None, allowed_origins: AllowedOrigins = None, max_connections: MaxConnections = 1000,
    header_timeout: HeaderTimeout = 10.0, body_timeout: BodyTimeout = 60.0, idle_timeout: IdleTimeout = 30.0,
    shutdown_timeout: ShutdownTimeout = 30.0, log_format: LogFormat = "text",
):
    """Serve the model over the OpenAI and Anthropic HTTP APIs (tool calls, reasoning, streaming).

    Example: glm-mlx serve ./GLM-5.1-mlx --port 8080, then point an OpenAI client at http://127.0.0.1:8080/v1
    or an Anthropic client (ANTHROPIC_BASE_URL) at http://127.0.0.1:8080
    """
    from glm_mlx.serve.server import Timeouts, bind, run
    from glm_mlx.serve.stream import ServerConfig
    from glm_mlx.serve.worker import Worker

    access = policy(host, read_keys(api_key, api_key_file), no_auth, allowed_host, allowed_origins, log_format)

    if log_level.lower() not in ("warning", "info", "debug"):
        raise ServeError(f"--log-level must be warning, info or debug, got {log_level!r}")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("glm_mlx.serve").setLevel(log_level.upper())
    model = pick_model(model, model_opt)
    template_args = _template_args(chat_template_args)
    check_kv_bits(kv_bits)  # here, not in the worker thread that loads the model
    err = Console(stderr=True)
    holder = {}

    def loader():  # runs in the worker thread: the model's arrays belong to it
        m, tokenizer, path = load_for_generation(model, context=context or 8192, mtp=not no_mtp, kv_bits=kv_bits)
        holder.update(path=path, **_budget(path, m.args, not no_mtp, context, max_batch))
        worker.max_batch = holder["batch"]  # before the worker sizes its batch and cache pool
        return m, tokenizer

    make_prefix = None if no_prefix_cache else _prefix_factory(holder, cache_dir, cache_memory, cache_disk, cache_block,
                                                                  not no_mtp)
    worker = Worker(loader, mtp=not no_mtp, num_draft=num_draft, prefill_step=prefill_step, cache_slots=cache_slots,
                    max_queue=max_queue, prefix_cache=make_prefix, prefill_budget=prefill_budget)
    worker.start()
    worker.wait_ready()
    path, args, limit = holder["path"], worker.model.args, holder["limit"]
    gen = _generation_defaults(path)
    cfg = ServerConfig(model_id=path.name, context=limit, max_tokens=max_tokens, vocab_size=args.vocab_size,
                       thinking=template_args.get("enable_thinking", reasoning), template_args=template_args, keepalive=keepalive, **gen)
    try:
        sock = bind(host, port)
    except OSError as e:
        worker.stop()
        worker.join(timeout=120)  # it frees its MLX streams on the way out (see Worker.run)
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                         "Pick another --port (0 takes any free one), or stop what is using it.") from None
    prefix = worker.prefix
    cache_note = "no prefix cache" if prefix is None else (
        f"prefix cache {prefix.memory_bytes / 1e9:.1f} GB RAM + {prefix.disk_limit / 1e9:.0f} GB at {prefix.disk_dir}")
    shown = f"[{host}]" if ":" in host else host
    err.print(f"Serving {path.name} on http://{shown}:{sock.getsockname()[1]} (OpenAI: /v1/chat/completions, "
              f"/v1/responses; Anthropic: /v1/messages; status page: /; context {limit:,} tokens, batch "
              f"{worker.batch.max_batch}, {cache_note}; {'API key required' if access.api_keys else 'no API key'}; "
              "Ctrl-C to stop)", soft_wrap=True)
    if no_auth and not is_loopback(host):
        err.print(f"[yellow]Warning:[/] --no-auth: anyone who can reach {host} can use the model", soft_wrap=True)
    try:
        run(worker, cfg, access, sock, max_connections=max_connections,
            timeouts=Timeouts(header_timeout, body_timeout, idle_timeout, shutdown_timeout))
    finally:
        sock.close()
        worker.join(timeout=120)


def _budget(path, args, mtp: bool, context: int | None, max_batch: int | None) -> dict:
    """The flags, or what fits beside the weights in GPU memory: the context limit per request, the
    sequences decoded together (full-context caches, at most DEFAULT_MAX_BATCH) and the bytes left for
    the prefix cache's RAM tier (None where the backend does not say)."""
    from glm_mlx.quantize.serving import DEFAULT_MAX_BATCH, split_room

    limit, fits = _context_limit(path, args, mtp, context)
    if fits is None:
        return {"limit": limit, "batch": max_batch or DEFAULT_MAX_BATCH, "prefix_ram": None}
    batch, left = split_room(fits, limit, max_batch)  # in tokens of cache
    return {"limit": limit, "batch": batch, "prefix_ram": left * args.cache_bytes_per_token(2, mtp=mtp)}


def _prefix_factory(holder, cache_dir, cache_memory, cache_disk, block, mtp):
    """make(model) for the worker thread: the prefix cache, sized by the flags or `_budget` (2 GB of RAM
    where the backend does not say)."""
    from glm_mlx.quantize.macs import parse_size

    memory = None if cache_memory is None else int(parse_size(cache_memory))
    disk = int(parse_size(cache_disk))

    def make(model):
        from glm_mlx.prefix.cache import PrefixCache, default_cache_dir

        ram = memory if memory is not None else holder["prefix_ram"]
        return PrefixCache(model, identity=_identity(holder["path"]), block_size=block, mtp=mtp and model.has_mtp,
                           memory_bytes=2 * 10**9 if ram is None else ram,
                           disk_dir=cache_dir or default_cache_dir(), disk_bytes=disk, write_through=True)

    return make


def _identity(path) -> str:
    """Names the weights: the folder, its config and every weight file's size and mtime (a re-converted
    or re-downloaded checkpoint starts a new cache)."""
    import hashlib

    files = sorted(path.glob("*.safetensors"))
    parts = [str(path.resolve()), (path / "config.json").read_text()]
    parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _context_limit(path, args, mtp: bool, asked: int | None) -> tuple[int, int | None]:
    """(context limit per request, tokens of cache that fit beside the weights or None)."""
    from glm_mlx.memory import context_that_fits

    model_max = args.max_position_embeddings
    if asked is not None and asked > model_max:
        raise ServeError(f"--context {asked} is beyond the model's {model_max} tokens")
    fits = context_that_fits(path, args, mtp=mtp)
    limit = asked or (model_max if fits is None else min(model_max, fits))
    if fits is not None and limit > fits:
        Console(stderr=True).print(f"[yellow]Warning:[/] --context {limit:,} is more than the {fits:,} tokens of cache "
                                   "that fit beside the weights", soft_wrap=True)
    return limit, fits


def _generation_defaults(path) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json (do_sample false: greedy)."""
    try:
        cfg = json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if cfg.get("do_sample") is False:
        return {"temperature": 0.0}
    out = {}
    if isinstance(cfg.get("temperature"), (int, float)):
        out["temperature"] = float(cfg["temperature"])
    if isinstance(cfg.get("top_p"), (int, float)):
        out["top_p"] = float(cfg["top_p"])
    return out
