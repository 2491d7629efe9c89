"""`glm-mlx serve`'s options for who may reach the server and how long a connection may take."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from glm_mlx.errors import GlmMlxError

KEY_ENV = "GLM_MLX_API_KEY"

ApiKey = Annotated[Optional[List[str]], typer.Option(
    "--api-key", help=f"A key clients must send (Authorization: Bearer KEY or x-api-key); repeatable. Also "
    f"--api-key-file and ${KEY_ENV}.", show_default=False)]
ApiKeyFile = Annotated[Optional[Path], typer.Option(
    "--api-key-file", help="A file with one key per line (# comments allowed).", show_default=False)]
NoAuth = Annotated[bool, typer.Option(
    "--no-auth", help="Serve a non-loopback address without a key (anyone who can reach it can use the model).")]
AllowedHost = Annotated[Optional[List[str]], typer.Option(
    "--allowed-host", help="A host name clients may use besides the bound address and localhost (the Host header "
    "is checked against DNS rebinding); repeatable.", show_default=False)]
AllowedOrigins = Annotated[Optional[List[str]], typer.Option(
    "--allowed-origins", help="A web origin (e.g. http://localhost:3000) whose pages may call the API (CORS); "
    "repeatable or comma-separated. Default: none, so a page you visit cannot use your model.",
    show_default=False)]
MaxConnections = Annotated[int, typer.Option("--max-connections", help="Open connections at most; more are "
                                             "answered 503 at once.")]
HeaderTimeout = Annotated[float, typer.Option("--header-timeout", help="Seconds a request's headers may "
                                              "take to arrive.")]
BodyTimeout = Annotated[float, typer.Option("--body-timeout", help="Seconds a request's body may take.")]
IdleTimeout = Annotated[float, typer.Option("--idle-timeout", help="Seconds an idle keep-alive connection "
                                            "stays open.")]
ShutdownTimeout = Annotated[float, typer.Option("--shutdown-timeout", help="Seconds running requests may "
                                                "finish after SIGTERM / Ctrl-C; the rest end with an error.")]
LogFormat = Annotated[str, typer.Option("--log-format", help="The access log: text or json (one object per line).")]


class AccessError(GlmMlxError):
    hint = "glm-mlx serve --help lists the access options; docs/reliability.md says how to serve a LAN safely."


def read_keys(keys: list[str] | None, key_file: Path | None) -> list[str]:
    out = [k.strip() for k in keys or [] if k.strip()]
    if key_file is not None:
        try:
            text = key_file.read_text()
        except OSError as e:
            raise AccessError(f"cannot read --api-key-file {key_file}: {e.strerror or e}") from None
        out += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not out:
            raise AccessError(f"--api-key-file {key_file} holds no key")
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        out.append(env)
    return out


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def policy(host: str, keys: list[str], no_auth: bool, allowed_hosts, allowed_origins, log_format: str):
    from glm_mlx.serve.front_door import Policy

    if log_format not in ("text", "json"):
        raise AccessError(f"--log-format must be text or json, got {log_format!r}")
    if not is_loopback(host) and not keys and not no_auth:
        raise AccessError(
            f"--host {host} serves beyond this machine, and no API key is set",
            f"Set one (--api-key KEY, --api-key-file FILE or ${KEY_ENV}), or pass --no-auth if anyone who can "
            "reach this address may use the model.")
    origins = {o.strip().rstrip("/") for item in allowed_origins or [] for o in item.split(",") if o.strip()}
    for o in origins:
        if "://" not in o and o != "*":
            raise AccessError(f"--allowed-origins {o!r} is not an origin (scheme://host[:port])")
    return Policy(host=host.strip("[]"), api_keys=keys, allowed_hosts={h.strip().lower() for h in allowed_hosts or []},
                  allowed_origins=origins, log_format=log_format)
