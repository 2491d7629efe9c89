"""`glm-mlx chat`: an interactive terminal chat over glm_mlx.chat.ChatSession."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typing_extensions import Annotated

from .generate import format_stats, stats_dict
from .options import MaxTokens, ModelArg, NoMtp, NumDraft, Seed, Temp, TopP, load_for_generation

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
    model: ModelArg = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt.")] = None,
    think: Annotated[bool, typer.Option("--think/--no-think", help="Start in thinking mode.")] = False,
    max_tokens: MaxTokens = 1024, temp: Temp = 0.0, top_p: TopP = 1.0, seed: Seed = None,
    no_mtp: NoMtp = False, num_draft: NumDraft = 1,
):
    """Chat with a model in the terminal (multi-turn, prompt cache reused across turns).

    Example: glm-mlx chat ./GLM-5.1-mlx --think
    """
    from glm_mlx.chat import ChatSession

    out = Console(highlight=False, soft_wrap=True)
    m, tokenizer, path = load_for_generation(model, mtp=not no_mtp)
    session = ChatSession(m, tokenizer, system=system, thinking=think, mtp=not no_mtp, num_draft=num_draft,
                          gen_kwargs=dict(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed))
    out.print(f"[bold]glm-mlx chat[/] - {escape(path.name)} (MTP {'on' if m.has_mtp and not no_mtp else 'off'},"
              f" thinking {'on' if think else 'off'}). /help for commands.")
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
