"""`glm-mlx chat`: an interactive terminal chat over glm_mlx.generation.chat.ChatSession."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from .generate import Think, format_stats, open_prompt_cache, save_prompt_cache, stats_dict
from .options import (ExtraEos, KvBits, MaxTokens, MinP, ModelArg, ModelOpt, NoMtp, NumDraft, PrefillStep,
                      PromptCacheFile, Seed, Stop, SystemPrompt, Temp, TemplateArgs, TopK, TopP, add_extra_eos,
                      load_for_generation, parse_template_args, pick_model)

HELP = '''[bold]Commands[/]
  /think            toggle thinking mode (reasoning shown dimmed, never fed back)
  /system TEXT      set the system prompt (and start over)
  /reset            forget the conversation
  /save FILE        save the conversation and its prompt cache
  /load FILE        load a saved conversation
  /stats            speed, MTP acceptance and memory of the last answer
  /help             this help
  /exit             quit (or Ctrl-D; Ctrl-C twice at an empty prompt)
Several lines: start with """ and end with a line holding only """ (paste a block between them),
or end a line with \\ to continue on the next one.
Ctrl-C while an answer streams stops it and returns to the prompt.'''

FENCE = '"""'  # opens and closes a multi-line message


def _read_line(prompt: str) -> str:
    try:
        import readline  # noqa: F401 - importing it gives input() line editing and history
    except ImportError:  # pragma: no cover - Windows
        pass
    return input(prompt)


def read_message(read=_read_line) -> str:
    """One message: a line; lines joined while each ends with a backslash; or a FENCE ... FENCE block."""
    line = read(">>> ")
    if line.strip().startswith(FENCE):
        first = line.strip()[len(FENCE):]
        if first.endswith(FENCE):  # the block opened and closed on one line
            return first[: -len(FENCE)]
        lines = [first] if first else []
        while True:
            more = read("... ")
            if more.rstrip().endswith(FENCE):
                lines.append(more.rstrip()[: -len(FENCE)])
                return "\n".join(lines).strip("\n")
            lines.append(more)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read("... ")
    return "\n".join(lines + [line])


def chat(
    model: ModelArg = None, model_opt: ModelOpt = None, system: SystemPrompt = None,
    think: Think = None, chat_template_args: TemplateArgs = None,
    max_tokens: MaxTokens = 1024, temp: Temp = 0.0, top_p: TopP = 1.0, min_p: MinP = 0.0, top_k: TopK = 0,
    seed: Seed = None, stop: Stop = None, extra_eos_token: ExtraEos = None,
    no_mtp: NoMtp = False, num_draft: NumDraft = 1, prefill_step: PrefillStep = 2048,
    prompt_cache_file: PromptCacheFile = None, kv_bits: KvBits = None,
):
    """Chat with a model in the terminal (multi-turn, prompt cache reused across turns).

    Example: glm-mlx chat ./GLM-5.1-mlx --think
    """
    from glm_mlx.generation.chat import ChatSession

    template_args = parse_template_args(chat_template_args)  # before loading: a typo fails at once
    asked = template_args.pop("enable_thinking", None)
    think = think if think is not None else bool(asked)
    out = Console(highlight=False, soft_wrap=True)
    m, tokenizer, path = load_for_generation(pick_model(model, model_opt), mtp=not no_mtp, kv_bits=kv_bits)
    add_extra_eos(tokenizer, extra_eos_token)
    session = ChatSession(m, tokenizer, system=system, thinking=think, mtp=not no_mtp, num_draft=num_draft,
                          template_args=template_args,
                          gen_kwargs=dict(max_tokens=max_tokens, temp=temp, top_p=top_p, min_p=min_p, top_k=top_k,
                                          seed=seed, stop=stop, prefill_step=prefill_step))
    if prompt_cache_file:  # its tokens are reused where the conversation starts the same (e.g. a long system prompt)
        session.cache = open_prompt_cache(prompt_cache_file, m, path, mtp=not no_mtp)
    out.print(f"[bold]glm-mlx chat[/] - {escape(path.name)} (MTP {'on' if m.has_mtp and not no_mtp else 'off'},"
              f" thinking {'on' if think else 'off'}). /help for commands.")
    _loop(session, out)
    if prompt_cache_file:
        saved = save_prompt_cache(session.cache, prompt_cache_file, path, messages=session.messages,
                                  system=session.system)
        out.print(f"[dim]prompt cache saved to {escape(str(saved))} ({len(session.cache.tokens)} tokens)[/]")


def _loop(session, out: Console):
    """Read and answer messages until /exit, Ctrl-D, or Ctrl-C twice at an empty prompt."""
    interrupted = False
    while True:
        try:
            line = read_message()
        except EOFError:
            out.print()
            return
        except KeyboardInterrupt:
            if interrupted:
                out.print()
                return
            interrupted = True
            out.print("\n[dim](Ctrl-C again or /exit to quit)[/]")
            continue
        interrupted = False
        line = line.strip() if "\n" not in line else line  # a block keeps its indentation
        if not line.strip():
            continue
        if line.startswith("/") and "\n" not in line:
            if _command(line, session, out):
                return
            continue
        _answer(session, line, out)


def _answer(session, line, out: Console):
    kind = None
    try:
        for piece in session.send(line):
            if piece.kind != kind and piece.kind == "answer" and kind == "reasoning":
                out.print()
            kind = piece.kind
            out.print(escape(piece.text), end="", style="dim" if piece.kind == "reasoning" else None, soft_wrap=True)
    except KeyboardInterrupt:
        out.print("\n[yellow](stopped)[/]", end="")
    out.print()
    out.print(format_stats(stats_dict(session.last)), soft_wrap=True)


def _command(line: str, session, out: Console) -> bool:
    """Run a slash command; True means exit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/exit", "/quit"):
        return True
    if cmd == "/help":
        out.print(HELP)
    elif cmd == "/think":
        session.thinking = not session.thinking
        out.print(f"[dim]thinking {'on' if session.thinking else 'off'}[/]")
    elif cmd == "/system":
        session.system = arg or None
        session.reset()
        out.print("[dim]system prompt set; conversation restarted[/]")
    elif cmd == "/reset":
        session.reset()
        out.print("[dim]conversation cleared[/]")
    elif cmd in ("/save", "/load"):
        if hasattr(session.model, "broadcast_request"):  # a pipeline: the other ranks hold their caches
            out.print(f"[red]{cmd} is not supported in a multi-Mac chat yet[/]")
        elif not arg:
            out.print(f"[red]usage: {cmd} FILE[/]")
        else:
            try:
                path = session.save(arg) if cmd == "/save" else session.load(arg)
                out.print(f"[dim]{'saved to' if cmd == '/save' else 'loaded'} {escape(str(path))}"
                          f" ({len(session.messages)} messages, {len(session.cache.tokens)} cached tokens)[/]")
            except Exception as e:  # noqa: BLE001 - a bad file must not end the chat
                out.print(f"[red]Error:[/] {escape(str(e))}")
    elif cmd == "/stats":
        s = stats_dict(session.last)
        out.print(format_stats(s) if s else "[dim]no answer yet[/]")
        out.print(f"[dim]cache {session.cache.nbytes / 1e6:.1f} MB for {len(session.cache.tokens)} tokens[/]")
    else:
        out.print(f"[red]unknown command {escape(cmd)}[/] - /help lists them")
    return False
