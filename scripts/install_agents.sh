#!/usr/bin/env bash
# Install the real coding-agent clients that tests/test_agents.py drives against `glm-mlx serve`,
# at pinned versions, OUTSIDE the repository:
#   $GLM_MLX_AGENTS_DIR (default ~/.cache/glm-mlx-agents)
#     node/      npm --prefix: Claude Code, Codex CLI, opencode
#     aider/     aider-chat in a venv of its own (its pins clash with glm-mlx's)
# (opencode 1.18 bundles @ai-sdk/openai-compatible: `opencode run` installs nothing at run time.)
# Idempotent: a client already at its pinned version is skipped. Needs only node/npm and python.
# The LangChain packages come with the test extra (pyproject.toml).
set -euo pipefail

CLAUDE_CODE_VERSION=2.1.332
CODEX_VERSION=0.171.0
OPENCODE_VERSION=1.18.33
AIDER_VERSION=0.86.2

DIR="${GLM_MLX_AGENTS_DIR:-$HOME/.cache/glm-mlx-agents}"
NODE_DIR="$DIR/node"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DIR"

npm_installed() {  # npm_installed PREFIX PACKAGE VERSION: is PACKAGE@VERSION under PREFIX?
    local pj="$1/node_modules/$2/package.json"
    [ -f "$pj" ] && node -e 'process.exit(require(process.argv[1]).version === process.argv[2] ? 0 : 1)' "$pj" "$3"
}

if ! command -v npm >/dev/null; then
    echo "install_agents: npm not found: Claude Code, Codex and opencode are not installed" >&2
else
    want=()
    npm_installed "$NODE_DIR" @anthropic-ai/claude-code "$CLAUDE_CODE_VERSION" || want+=("@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION")
    npm_installed "$NODE_DIR" @openai/codex "$CODEX_VERSION" || want+=("@openai/codex@$CODEX_VERSION")
    npm_installed "$NODE_DIR" opencode-ai "$OPENCODE_VERSION" || want+=("opencode-ai@$OPENCODE_VERSION")
    if [ ${#want[@]} -gt 0 ]; then
        echo "install_agents: npm install ${want[*]}"
        mkdir -p "$NODE_DIR"
        [ -f "$NODE_DIR/package.json" ] || echo '{"name": "glm-mlx-agents", "private": true}' >"$NODE_DIR/package.json"
        npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error "${want[@]}"
    fi
fi

AIDER_VENV="$DIR/aider"
if [ -x "$AIDER_VENV/bin/aider" ] && "$AIDER_VENV/bin/python" -c \
        'import importlib.metadata as m, sys; sys.exit(m.version("aider-chat") != sys.argv[1])' "$AIDER_VERSION" 2>/dev/null; then
    :
else
    echo "install_agents: aider-chat==$AIDER_VERSION in $AIDER_VENV"
    "$PYTHON" -m venv "$AIDER_VENV"
    "$AIDER_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "aider-chat==$AIDER_VERSION"
fi
echo "install_agents: clients in $DIR"
