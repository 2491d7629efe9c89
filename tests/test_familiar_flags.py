"""Issue #16, familiar flags: mlx-lm's spellings work, the model goes positionally or as --model in every command
that runs one, and a short flag means one thing across every command."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest
import typer.main
from cli_util import assert_clean_error, command
from cli_util import invoke as _invoke

from glm_mlx.cli.app import app
from glm_mlx.cli.options import option_name

MODEL_COMMANDS = ("generate", "chat", "serve", "bench", "eval", "fit")
# Short flags whose meaning mlx-lm (mlx_lm.generate / chat / benchmark) fixes: where glm-mlx has them, they mean this.
MLX_LM_SHORT = {"-m": "--max-tokens", "-p": "--prompt", "-g": "--generation-tokens"}


def commands() -> dict:
    return typer.main.get_command(app).commands


def is_option(p) -> bool:  # by name, not class: recent Typer vendors its own click
    return p.param_type_name == "option"


def is_argument(p) -> bool:
    return p.param_type_name == "argument"


def short_flags() -> dict[str, set[tuple[str, str]]]:
    """short flag -> {(option's long name, command)} over every option of every command."""
    seen: dict[str, set[tuple[str, str]]] = {}
    for name, cmd in commands().items():
        for p in cmd.params:
            if is_option(p):
                for opt in (*p.opts, *p.secondary_opts):
                    if not opt.startswith("--"):
                        seen.setdefault(opt, set()).add((option_name(p), name))
    return seen


def invoke(*args, input=None):
    return _invoke(*args, ok=False, input=input)


def run(*args, check=True):
    return command(*args, ok=check)


@pytest.fixture(scope="module")
def ckpt(mtp_ckpt):
    return mtp_ckpt


# --- short flags ---------------------------------------------------------------------------------------------
def test_a_short_flag_means_one_thing_across_commands():
    seen = short_flags()
    assert {"-m", "-p", "-c"} <= set(seen), "the introspection found too few short flags"
    clashes = {flag: sorted(uses) for flag, uses in seen.items() if len({long for long, _ in uses}) > 1}
    assert clashes == {}, f"short flags with two meanings: {clashes}"


def test_short_flags_follow_mlx_lm():
    seen = short_flags()
    for flag, long in MLX_LM_SHORT.items():
        assert {lg for lg, _ in seen.get(flag, set())} <= {long}, (flag, seen.get(flag))
    assert "-h" not in seen  # -h is help everywhere (mlx-lm and hf), never an option


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_help_has_h_and_both_model_spellings(command):
    cmd = commands()[command]
    assert [p for p in cmd.params if is_argument(p) and p.name == "model" and not p.required]
    assert [p for p in cmd.params if is_option(p) and "--model" in p.opts]
    r = invoke(command, "-h")
    assert r.exit_code == 0 and "Usage" in r.stdout and "--model" in r.stdout


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_two_different_models_are_a_one_line_error(command, tmp_path):
    extra = ["--reference", "r", "--text", "t.txt"] if command == "eval" else []
    r = invoke(command, tmp_path / "a", "--model", tmp_path / "b", *extra)
    assert_clean_error(r, "--model", "different models", in_line=True)


def test_eval_needs_a_model():
    r = invoke("eval", "--reference", "r", "--text", "t.txt")
    assert_clean_error(r, "no MODEL given", in_line=True)


# --- the model, both ways -------------------------------------------------------------------------------------
def test_generate_model_positional_or_option_in_the_real_cli(ckpt):
    by_option = json.loads(run("generate", "--model", ckpt, "-p", "hi", "-m", 4, "--json").stdout)
    positional = json.loads(run("generate", ckpt, "-p", "hi", "-m", 4, "--json").stdout)
    assert by_option == {**positional, **{k: by_option[k] for k in ("prompt_tps", "generation_tps", "peak_memory_gb")}}
    assert by_option["generation_tokens"] <= 4 and by_option["text"] == positional["text"]
    plain = run("generate", "--model", ckpt, "-p", "hi", "-m", 4)  # text on stdout, the stats line on stderr
    assert plain.stdout == positional["text"] + "\n" and "tok/s" in plain.stderr


def test_the_same_model_spelled_twice_is_fine(ckpt):
    r = invoke("generate", ckpt, "--model", f"{ckpt}/.", "-p", "hi", "-m", 2, "--json")
    assert r.exit_code == 0, r.output


def test_bench_and_fit_take_model(ckpt):
    r = invoke("bench", "--model", ckpt, "--prompt-tokens", 24, "--generation-tokens", 4, "--prefill-step-size", 16,
               "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["gen_tokens"] == 4
    r = invoke("bench", ckpt, "--prompt-tokens", 24, "-g", 4, "--gen-tokens", 4, "--json")  # the old spelling stays
    assert r.exit_code == 0, r.output
    fits = [json.loads(invoke("fit", *args, "--mac", "m4-max-128", "--json").stdout)
            for args in ([ckpt], ["--model", ckpt])]
    assert fits[0] == fits[1] and fits[0]["weights_bytes"] > 0


def test_serve_takes_model_and_prefill_step_size(ckpt):
    from server_util import Server

    s = Server("--model", str(ckpt), "--prefill-step-size", "16", "--no-prefix-cache",
               "--chat-template-args", '{"enable_thinking": false}').start()
    try:
        with urllib.request.urlopen(f"{s.url}/v1/models", timeout=30) as resp:
            ids = [m["id"] for m in json.loads(resp.read())["data"]]
        assert ids == [ckpt.name]
    finally:
        s.stop()


# --- prompt cache ------------------------------------------------------------------------------------------------
def test_prompt_cache_file_reuses_the_prefix_in_the_real_cli(ckpt, tmp_path):
    cache = tmp_path / "prompt.safetensors"
    first = json.loads(run("generate", ckpt, "-p", "hello there", "-m", 6, "--json", "--prompt-cache-file", cache).stdout)
    assert first["reused_tokens"] == 0 and cache.exists()
    second = json.loads(run("generate", ckpt, "-p", "hello there", "-m", 6, "--json",
                            "--prompt-cache-file", cache).stdout)
    total = first["prompt_tokens"]
    assert second["reused_tokens"] == total - 1 and second["prompt_tokens"] == 1  # one token left to start from
    assert second["text"] == first["text"]  # greedy: the cache changes the cost, not the answer
    plain = run("generate", ckpt, "-p", "hello there", "-m", 6, "--prompt-cache-file", cache)
    assert f"(+{total - 1} reused)" in plain.stderr


def test_prompt_cache_file_shares_a_system_prompt(ckpt, tmp_path):
    cache = tmp_path / "sys"  # any file name: mlx-lm users pass .safetensors, others need not
    system = "You answer in one short line, in English, and never in French."
    r = invoke("generate", ckpt, "--system-prompt", system, "-p", "first", "-m", 3, "--json", "--prompt-cache-file", cache)
    assert r.exit_code == 0, r.output
    r = invoke("generate", ckpt, "--system-prompt", system, "-p", "other", "-m", 3, "--json", "--prompt-cache-file", cache)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["reused_tokens"] > len(system)  # the character-level test tokenizer: a token a char


def test_prompt_cache_of_another_model_is_a_one_line_error(ckpt, tmp_path):
    cache = tmp_path / "c.safetensors"
    assert invoke("generate", ckpt, "-p", "hi", "-m", 2, "--prompt-cache-file", cache).exit_code == 0
    other = tmp_path / "copy"
    shutil.copytree(ckpt, other)
    r = invoke("generate", other, "-p", "hi", "-m", 2, "--prompt-cache-file", cache)
    assert_clean_error(r, "prompt cache", "made with the model", in_line=True)


def test_chat_prompt_cache_file_and_sampling_flags(ckpt, tmp_path):
    cache = tmp_path / "chat.safetensors"
    args = ["chat", "--model", ckpt, "-m", 4, "--top-k", 5, "--min-p", 0.05, "--stop", "\x00", "--temp", 0.5,
            "--seed", 1, "--prefill-step-size", 16, "--system-prompt", "Be brief.", "--prompt-cache-file", cache]
    r = invoke(*args, input="hi\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "prompt cache saved to" in r.output and cache.exists()
    r = invoke(*args, input="hello again\n")  # Ctrl-D ends it; the system prompt's tokens come from the file
    assert r.exit_code == 0, r.output
    assert " reused)" in r.output
    r = invoke("chat", ckpt, "-m", 2, "--system", "old spelling", input=f"/load {cache}\n/exit\n")
    assert "loaded" in r.output and "2 messages" in r.output  # /load reads what --prompt-cache-file saved


# --- eos, template, system prompt -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def greedy(ckpt):
    """(token ids, token strings) of the greedy answer to 'hi' (no MTP, as the CLI runs it with --no-mtp)."""
    from glm_mlx import load, stream_generate

    model, tok = load(str(ckpt), mtp=False)
    ids = [r.token for r in stream_generate(model, tok, [{"role": "user", "content": "hi"}], max_tokens=12,
                                            enable_thinking=False, mtp=False)]
    return ids, tok.convert_ids_to_tokens(ids)


def test_extra_eos_token_stops_there_in_the_real_cli(ckpt, greedy):
    ids, names = greedy
    # The first token from the third on whose vocabulary spelling is plain and that did not come earlier.
    i = next(i for i in range(2, len(ids)) if names[i] and names[i].isalnum() and ids[i] not in ids[:i])
    full = json.loads(run("generate", ckpt, "-p", "hi", "-m", 12, "--json", "--no-mtp").stdout)
    cut = json.loads(run("generate", ckpt, "-p", "hi", "-m", 12, "--json", "--no-mtp",
                         "--extra-eos-token", names[i]).stdout)
    assert cut["finish_reason"] == "stop" and cut["generation_tokens"] == i + 1
    assert full["text"].startswith(cut["text"]) and len(cut["text"]) < len(full["text"])
    by_id = invoke("generate", ckpt, "-p", "hi", "-m", 12, "--json", "--no-mtp", "--extra-eos-token", "99999",
                   "--extra-eos-token", str(ids[i]))
    assert by_id.exit_code == 1 and "99999" in by_id.stderr  # ids outside the vocabulary are refused
    by_id = invoke("generate", ckpt, "-p", "hi", "-m", 12, "--json", "--no-mtp", "--extra-eos-token", str(ids[i]))
    assert json.loads(by_id.stdout)["generation_tokens"] == i + 1


def test_extra_eos_token_must_be_one_token(ckpt):
    r = invoke("generate", ckpt, "-p", "hi", "--extra-eos-token", "several chars")
    assert_clean_error(r, "--extra-eos-token", "not one token", in_line=True)


def test_chat_template_args_bad_json_in_the_real_cli(ckpt):
    r = run("generate", ckpt, "-p", "hi", "--chat-template-args", "{enable_thinking: false}", check=False)
    assert_clean_error(r, "--chat-template-args", "not valid JSON", in_line=True)


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_chat_template_args_must_be_an_object(command, ckpt):
    r = invoke(command, ckpt, "--chat-template-args", "[1, 2]", input="")
    assert_clean_error(r, "--chat-template-args", "JSON object", in_line=True)


def test_chat_template_args_reach_the_template(ckpt):
    def prompt_tokens(*args):
        r = invoke("generate", ckpt, "-p", "hi", "-m", 1, "--json", *args)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["prompt_tokens"]

    off = prompt_tokens()  # the test template closes an empty <think></think> when thinking is off
    on = prompt_tokens("--chat-template-args", '{"enable_thinking": true}')
    assert on < off
    assert prompt_tokens("--chat-template-config", '{"enable_thinking": true}') == on  # mlx_lm.generate's spelling
    assert prompt_tokens("--no-think", "--chat-template-args", '{"enable_thinking": true}') == off  # the flag wins
    assert prompt_tokens("--think") == on


def test_system_prompt_and_its_alias(ckpt):
    counts = []
    for args in ([], ["--system-prompt", "Be brief."], ["--system", "Be brief."]):
        r = invoke("generate", ckpt, "-p", "hi", "-m", 1, "--json", *args)
        assert r.exit_code == 0, r.output
        counts.append(json.loads(r.stdout)["prompt_tokens"])
    assert counts[1] == counts[2] > counts[0]


def test_ignore_chat_template_is_raw(ckpt):
    outs = [json.loads(invoke("generate", ckpt, "-p", "hi", "-m", 3, "--json", flag).stdout)
            for flag in ("--raw", "--ignore-chat-template")]
    assert outs[0]["text"] == outs[1]["text"] and outs[0]["prompt_tokens"] == outs[1]["prompt_tokens"]
