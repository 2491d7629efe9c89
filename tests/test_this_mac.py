"""The Mac this runs on (replayed sysctl / system_profiler output of real Mac models), the catalog of
Apple Silicon chips, and the product names `--mac` takes."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from glm_mlx.cli import fit as fit_cli
from glm_mlx.cli.app import app
from glm_mlx.quantize import this_mac
from glm_mlx.quantize.allocate import allocate
from glm_mlx.quantize.macs import CHIPS, GiB, MiB, MacError, catalog, get_mac, mac_names, products
from glm_mlx.quantize.planner import glm51_args, plan
from glm_mlx.quantize.this_mac import detect, detect_mac, mac_from, parse_chip, parse_gpu_cores, parse_wired_limit

runner = CliRunner()


def _profiler(chip: str, cores: int, displays: str) -> str:
    """`system_profiler SPDisplaysDataType` as macOS 15 prints it on Apple Silicon."""
    return (f"Graphics/Displays:\n\n    {chip}:\n\n      Chipset Model: {chip}\n      Type: GPU\n      Bus: Built-In\n"
            f"      Total Number of Cores: {cores}\n      Vendor: Apple (0x106b)\n      Metal Support: Metal 3\n"
            f"      Displays:\n{displays}\n")


STUDIO_DISPLAY = """        Studio Display:
          Resolution: 5120 x 2880 Retina
          UI Looks like: 2560 x 1440 @ 60.00Hz
          Main Display: Yes
          Mirror: Off
          Online: Yes
          Automatically Adjust Brightness: No
          Connection Type: Thunderbolt/DisplayPort"""
BUILT_IN_XDR = """        Color LCD:
          Display Type: Built-in Liquid Retina XDR Display
          Resolution: 3456 x 2234 Retina
          Main Display: Yes
          Mirror: Off
          Online: Yes
          Automatically Adjust Brightness: Yes
          Connection Type: Internal"""
DELL_4K = """        DELL U2720Q:
          Resolution: 3840 x 2160 (2160p/4K UHD 1 - Ultra High Definition)
          UI Looks like: 1920 x 1080 @ 60.00Hz
          Main Display: Yes
          Mirror: Off
          Online: Yes
          Rotation: Supported"""
BUILT_IN_AIR = """        Color LCD:
          Display Type: Built-in Liquid Retina Display
          Resolution: 2560 x 1664 Retina
          Main Display: Yes
          Mirror: Off
          Online: Yes
          Automatically Adjust Brightness: Yes
          Connection Type: Internal"""

# name: (sysctl -n hw.memsize machdep.cpu.brand_string, system_profiler SPDisplaysDataType, the catalog entry)
MACS = {
    "Mac Studio M3 Ultra 512GB, 80-core GPU": ("549755813888\nApple M3 Ultra\n",
                                               _profiler("Apple M3 Ultra", 80, STUDIO_DISPLAY), "m3-ultra-512"),
    "MacBook Pro M4 Max 128GB, 40-core GPU": ("137438953472\nApple M4 Max\n",
                                              _profiler("Apple M4 Max", 40, BUILT_IN_XDR), "m4-max-128"),
    "Mac mini M2 Pro 16GB, 19-core GPU": ("17179869184\nApple M2 Pro\n",
                                          _profiler("Apple M2 Pro", 19, DELL_4K), "m2-pro-16"),
    "Mac mini M4 16GB, 10-core GPU": ("17179869184\nApple M4\n", _profiler("Apple M4", 10, DELL_4K), "m4-16"),
    "MacBook Air M4 16GB, 8-core GPU": ("17179869184\nApple M4\n", _profiler("Apple M4", 8, BUILT_IN_AIR), "m4-16-8c"),
}


def replay(sysctl: str, profiler: str, wired: str | None = "0\n"):
    """A `run` that answers like macOS; wired None: a macOS without iogpu.wired_limit_mb (sysctl fails)."""
    def run(cmd: list[str]) -> str:
        if cmd == ["sysctl", "-n", "hw.memsize", "machdep.cpu.brand_string"]:
            return sysctl
        if cmd == ["system_profiler", "SPDisplaysDataType"]:
            return profiler
        if cmd == ["sysctl", "-n", "iogpu.wired_limit_mb"] and wired is not None:
            return wired
        raise subprocess.CalledProcessError(1, cmd, "", f"sysctl: unknown oid '{cmd[-1]}'")
    return run


@pytest.fixture
def on_macos(monkeypatch):
    monkeypatch.setattr(this_mac.platform, "system", lambda: "Darwin")


@pytest.mark.parametrize("model", list(MACS))
def test_detect_reads_recorded_macs(model, on_macos):
    sysctl, profiler, name = MACS[model]
    want = get_mac(name)
    here = detect(replay(sysctl, profiler))
    assert here.is_mac and here.system == "Darwin"
    assert here.mac == want and here.mac.wired_limit == want.default_wired_limit and here.wired_limit_mb == 0
    assert detect_mac(replay(sysctl, profiler)) == want


def test_parsers_on_recorded_text():
    assert parse_chip("Apple M3 Ultra") == "m3-ultra" and parse_chip("Apple M4") == "m4"
    assert parse_chip("Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz") is None
    assert parse_gpu_cores(MACS["Mac mini M2 Pro 16GB, 19-core GPU"][1]) == 19
    assert parse_gpu_cores("Graphics/Displays:\n") is None
    assert parse_wired_limit("0\n") == 0 and parse_wired_limit("458752\n") == 458752
    assert parse_wired_limit("") == 0 and parse_wired_limit("sysctl: unknown oid") == 0


def test_a_raised_wired_limit_rides_on_the_mac_and_decides_the_verdict(on_macos):
    sysctl, profiler, _ = MACS["Mac Studio M3 Ultra 512GB, 80-core GPU"]
    here = detect(replay(sysctl, profiler, "520000\n"))
    assert here.wired_limit_mb == 520000 and here.mac.wired_limit == 520000 * MiB
    assert here.mac.name == "m3-ultra-512" and here.mac.max_wired_limit == 520000 * MiB  # above RAM - reserve
    glm = glm51_args()
    recipe = allocate(glm, 530e9)  # between the default limit (527.8 GB) and RAM - 16 GiB (532.6 GB) at 8K
    assert plan(glm, recipe, get_mac("m3-ultra-512"), 8192).fits == "raise-wired-limit"
    p = plan(glm, recipe, here.mac, 8192)
    assert p.fits == "yes" and p.wired_limit_bytes == 520000 * MiB and p.sysctl is None
    assert any("iogpu.wired_limit_mb=520000" in a for a in p.assumptions)


def test_missing_tools_and_other_machines(on_macos, monkeypatch, tmp_path):
    sysctl, profiler, _ = MACS["MacBook Pro M4 Max 128GB, 40-core GPU"]
    older = detect(replay(sysctl, profiler, wired=None))  # macOS 14: no iogpu.wired_limit_mb
    assert older.mac == get_mac("m4-max-128") and older.wired_limit_mb == 0
    no_profiler = replay(sysctl, "")
    assert detect(no_profiler).mac == get_mac("m4-max-128")  # no core count: the largest bin of that memory
    intel = detect(replay("34359738368\nIntel(R) Core(TM) i9-9980HK CPU @ 2.40GHz\n", ""))
    assert not intel.is_mac and intel.mac.name == "this-machine-32"
    odd = mac_from(int(200 * GiB), "Apple M2 Ultra", 76)  # a size the catalog lacks: the chip's bandwidth
    assert (odd.name, odd.bandwidth_gbs, odd.chip) == ("m2-ultra-200", 800, "m2-ultra")
    monkeypatch.setattr(this_mac.platform, "system", lambda: "Linux")
    linux = detect(replay(sysctl, profiler), folder=tmp_path / "not" / "yet")
    assert not linux.is_mac and linux.system == "Linux"
    assert linux.disk_path == str(tmp_path) and linux.free_disk_bytes > 0  # the nearest existing parent
    assert json.dumps(linux.to_dict())


# --- the catalog ----------------------------------------------------------------------------------
def test_every_chip_tier_is_in_the_catalog_with_apples_figures():
    tiers = {f"m{g}{t}" for g in range(1, 6) for t in ("", "-pro", "-max")} | {"m1-ultra", "m2-ultra", "m3-ultra"}
    assert tiers <= set(CHIPS)
    figures = {  # name: (bandwidth GB/s, GPU cores)
        "m1-8-7c": (68.25, 7), "m1-16": (68.25, 8), "m2-24": (100, 10), "m2-8-8c": (100, 8), "m3-24-8c": (100, 8),
        "m3-16": (100, 10), "m4-16-8c": (120, 8), "m4-32": (120, 10), "m5-16": (153, 10), "m5-32": (153, 10),
        "m4-pro-64": (273, 20), "m3-max-36": (300, 30), "m3-max-48": (400, 40), "m4-max-36": (410, 32),
        "m4-max-128": (546, 40), "m1-ultra-128": (800, 64), "m2-ultra-192": (800, 76), "m3-ultra-96-60c": (819, 60),
        "m3-ultra-512": (819, 80), "m5-max-128": (614, 40),
    }
    for name, (bw, cores) in figures.items():
        m = get_mac(name)
        assert (m.bandwidth_gbs, m.gpu_cores) == (bw, cores), name
    for absent in ("m1-24", "m2-32", "m5-8", "m3-ultra-128", "m4-max-96"):
        with pytest.raises(MacError):
            get_mac(absent)
    names = mac_names()
    assert len(names) == len(set(names)) == len(catalog())
    for name in names:
        m = get_mac(name)
        assert products(m.chip) and m.max_wired_limit >= m.wired_limit == m.default_wired_limit > 0, name


@pytest.mark.parametrize("product,name", [
    ("Mac Studio M3 Ultra 512GB", "m3-ultra-512"),
    ("mac-studio-m3-ultra-512", "m3-ultra-512"),
    ("Mac mini M4 Pro 64GB", "m4-pro-64"),
    ("MacBook Pro M4 Max 128GB", "m4-max-128"),
    ("iMac M4 24GB", "m4-24"),
    ("MacBook Air M2 8GB 8-core GPU", "m2-8-8c"),
    ("MacBook Pro 14-inch (2023) M3 Max 36GB 30-core GPU", "m3-max-36-30c"),
    ('MacBook Pro 16" M4 Max 14-core CPU 32-core GPU 36GB', "m4-max-36-32c"),
    ("Mac Pro M2 Ultra 192GB", "m2-ultra-192"),
    ("M4-Max-36GB", "m4-max-36"),
    ("Apple M3 Ultra 96 GB 60-core GPU", "m3-ultra-96-60c"),
])
def test_product_names_resolve(product, name):
    assert get_mac(product) == get_mac(name) and get_mac(name).name == name


@pytest.mark.parametrize("text,needle", [
    ("Mac Studio M3 Ultra 128GB", "the M3 Ultra comes with 96, 256 or 512 GB; did you mean m3-ultra-96, m3-ultra-256, m3-ultra-512?"),
    ("m3-ultra-521", "did you mean m3-ultra-512"),
    ("Mac Studio M3 Ultra", "(name the memory); did you mean m3-ultra-96, m3-ultra-256, m3-ultra-512?"),
    ("m3-max-128-30c", "the 30-core M3 Max comes with 36 or 96 GB; did you mean m3-max-128"),
    ("m3-max-64-32c", "the M3 Max comes with a 30-core or 40-core GPU"),
    ("Mac mini M6 32GB", "no M6 in the catalog"),
    ("a banana", "unknown Mac 'a banana'"),
])
def test_unknown_combinations_say_what_exists(text, needle):
    with pytest.raises(MacError) as e:
        get_mac(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_fit_mac_list_and_product_names():
    r = runner.invoke(app, ["fit", "--mac", "list"])
    assert r.exit_code == 0
    for text in ("m1-8-7c", "68.25 GB/s", "m5-32", "153 GB/s", "m3-ultra-512", "Mac Studio", "MacBook Air", "Product names"):
        assert text in r.stdout, text
    r = runner.invoke(app, ["fit", "--mac", "Mac Studio M3 Ultra 256GB", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["mac"]["name"] == "m3-ultra-256"
    r = runner.invoke(app, ["fit", "--mac", "Mac Studio M3 Ultra 128GB"])
    assert r.exit_code == 1 and "comes with 96, 256 or 512 GB" in r.output and "Hint:" in r.output


# --- fit without --mac ----------------------------------------------------------------------------
def _as_this_mac(monkeypatch, sysctl, profiler, wired="0\n"):
    monkeypatch.setattr(this_mac.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(fit_cli, "detect", lambda folder=None: detect(replay(sysctl, profiler, wired), folder))


def test_fit_on_a_mac_plans_for_that_mac(monkeypatch, tmp_path):
    sysctl, profiler, _ = MACS["MacBook Pro M4 Max 128GB, 40-core GPU"]
    _as_this_mac(monkeypatch, sysctl, profiler)
    r = runner.invoke(app, ["fit", "--context", "8192", "--model", str(_config(tmp_path))])
    assert r.exit_code == 0, r.output
    assert "Planning for this Mac: m4-max-128 (128 GB, 546 GB/s, 40-core GPU), wired limit 107.5 GiB (macOS default)" in r.stdout
    assert r.stdout.startswith("Planning for this Mac") and f"free at {tmp_path}" in r.stdout
    d = json.loads(runner.invoke(app, ["fit", "--json"]).stdout)
    assert d["mac"]["name"] == "m4-max-128" and d["this_mac"]["is_mac"] and d["this_mac"]["free_disk_bytes"] > 0


def test_fit_uses_this_macs_raised_limit_for_the_verdict(monkeypatch):
    sysctl, profiler, _ = MACS["Mac Studio M3 Ultra 512GB, 80-core GPU"]
    _as_this_mac(monkeypatch, sysctl, profiler, "520000\n")
    args = ["fit", "--target-size", "530GB", "--context", "8192"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "wired limit 507.8 GiB (raised: iogpu.wired_limit_mb=520000)" in r.stdout
    assert "Fits within this Mac's raised GPU wired limit." in r.stdout
    d = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert d["fits"] == "yes" and d["this_mac"]["wired_limit_mb"] == 520000
    named = json.loads(runner.invoke(app, [*args, "--mac", "m3-ultra-512", "--json"]).stdout)
    assert named["fits"] == "raise-wired-limit" and "this_mac" not in named  # the catalog Mac: macOS's default


def test_fit_elsewhere_plans_for_the_default_mac_and_says_why(monkeypatch):
    monkeypatch.setattr(this_mac.platform, "system", lambda: "Linux")
    r = runner.invoke(app, ["fit"])
    assert r.exit_code == 0
    assert "Planning for the default catalog Mac m3-ultra-512: this is not a Mac (Linux)" in r.stdout
    assert "GLM-5.1 on m3-ultra-512" in r.stdout


@pytest.mark.skipif(platform.system() == "Darwin", reason="plans for this Mac on macOS")
def test_fit_console_script_off_a_mac():
    r = subprocess.run([sys.executable, "-m", "glm_mlx.cli.app", "fit"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Planning for the default catalog Mac m3-ultra-512: this is not a Mac ({platform.system()})")


def _config(tmp_path):
    from importlib.resources import files

    (tmp_path / "config.json").write_bytes((files("glm_mlx") / "data" / "glm-5.1-config.json").read_bytes())
    return tmp_path
