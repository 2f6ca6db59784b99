"""What minilora promises about adapter files, tried as an unlucky user and as an attacker would:
a save killed at any moment or read while it runs gives the old adapter or the new one, never a mix;
names stay inside the save directory; a safe merge changes all layers or none; non-finite numbers and
configs out of proportion with their tensors are refused before anything is allocated; files get
the usual modes; errors name the file and the field."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make
from minilora import LoraConfig, LoraModel, NF4Config, get_peft_model, quantize_model
from minilora.files import PENDING, STAGING_PREFIX
from minilora.adapter_files import CONFIG_NAME, MINILORA_CONFIG_NAME, WEIGHTS_NAME, read_adapter


def adapter(rank: int, seed: int) -> LoraModel:
    """A tiny GPT-2 with one acting adapter "default" of `rank`."""
    torch.manual_seed(seed)
    return get_peft_model(make("gpt2"), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_fc"],
                                                   init_lora_weights=False))


def fingerprint(directory: Path) -> tuple:
    """What a load of `directory` gives: the config's rank and every tensor, exactly."""
    config, tensors = read_adapter(directory)
    return config.r, {k: v.clone() for k, v in sorted(tensors.items())}


def same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Two adapters of different ranks, each saved once on its own: the expected fingerprints."""
    root = tmp_path_factory.mktemp("two")
    models = {"old": adapter(2, 0), "new": adapter(4, 1)}
    for name, model in models.items():
        model.save_pretrained(root / name)
    return models, {name: fingerprint(root / name) for name in models}


def save_forever(models, directory: Path) -> None:
    """In a forked child: save the two adapters into one directory, alternately, until killed."""
    torch.set_num_threads(1)  # the parent's OpenMP pool did not survive the fork: use none
    try:
        while True:
            for model in models.values():
                model.save_pretrained(directory)
    finally:
        os._exit(0)


# ------------------------------------------------------------------ 1. killed saves, concurrent readers
def test_a_save_killed_at_random_moments_leaves_exactly_one_adapter(two_adapters, tmp_path):
    models, expected = two_adapters
    directory = tmp_path / "adapter"
    models["old"].save_pretrained(directory)
    rng = random.Random(0)
    seen = {"old": 0, "new": 0}
    for _ in range(24):
        pid = os.fork()
        if pid == 0:
            save_forever(models, directory)
        time.sleep(rng.uniform(0.005, 0.12))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = fingerprint(directory)
        matches = [name for name, fp in expected.items() if same(got, fp)]
        assert len(matches) == 1, f"the directory loads as neither adapter (rank {got[0]})"
        seen[matches[0]] += 1
    assert min(seen.values()) > 0, seen  # the kills landed in saves of both kinds
    back = LoraModel.from_pretrained(make("gpt2"), directory)  # and the whole model loads it
    ids = torch.randint(0, 128, (2, 7))
    which = models["old"] if back.peft_config["default"].r == 2 else models["new"]
    torch.testing.assert_close(back(input_ids=ids).logits, which.eval()(input_ids=ids).logits)
    models["new"].save_pretrained(directory)  # a complete save cleans up after the killed ones
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []
    assert same(fingerprint(directory), expected["new"])


def test_a_reader_during_saves_always_gets_one_whole_adapter(two_adapters, tmp_path):
    models, expected = two_adapters
    directory = tmp_path / "adapter"
    models["old"].save_pretrained(directory)
    pid = os.fork()
    if pid == 0:
        save_forever(models, directory)
    try:
        kinds = []
        deadline = time.time() + 60
        while (len(kinds) < 40 or len(set(kinds)) < 2) and time.time() < deadline:
            got = fingerprint(directory)
            matches = [name for name, fp in expected.items() if same(got, fp)]
            assert len(matches) == 1, f"a load gave neither adapter (rank {got[0]})"
            kinds += matches
            time.sleep(0.005)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert len(kinds) >= 40 and set(kinds) == {"old", "new"}  # loads landed during saves of both


def test_a_commit_interrupted_half_way_reads_as_the_new_adapter(two_adapters, tmp_path):
    """Killed between the commit (the rename of the staged folder) and moving every file into place."""
    models, expected = two_adapters
    directory = tmp_path / "adapter"
    models["old"].save_pretrained(directory)
    models["new"].save_pretrained(tmp_path / "staged")
    pending = directory / PENDING
    pending.mkdir()
    for name in (WEIGHTS_NAME, CONFIG_NAME, "README.md", MINILORA_CONFIG_NAME):
        (tmp_path / "staged" / name).rename(pending / name)
    (pending / ".manifest.json").write_text(json.dumps(
        {"files": [WEIGHTS_NAME, CONFIG_NAME, "README.md", MINILORA_CONFIG_NAME], "remove": ["adapter_model.bin"]}))
    (pending / WEIGHTS_NAME).rename(directory / WEIGHTS_NAME)  # the first move happened, then the kill
    assert same(fingerprint(directory), expected["new"])
    models["old"].save_pretrained(directory)  # the next save finishes the old commit first
    assert not pending.exists() and same(fingerprint(directory), expected["old"])


def test_leftovers_of_killed_writers_are_ignored_then_cleaned(two_adapters, tmp_path):
    models, expected = two_adapters
    directory = tmp_path / "adapter"
    models["old"].save_pretrained(directory)
    (directory / f"{STAGING_PREFIX}abc").mkdir()
    (directory / f"{STAGING_PREFIX}abc" / WEIGHTS_NAME).write_bytes(b"half")
    (directory / f".{CONFIG_NAME}.x1y2.tmp").write_text("{")
    assert same(fingerprint(directory), expected["old"])
    models["new"].save_pretrained(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME, "README.md",
                                                                  MINILORA_CONFIG_NAME])


def test_weights_from_another_save_beside_a_record_are_refused(two_adapters, tmp_path):
    models, _ = two_adapters
    models["old"].save_pretrained(tmp_path / "a")
    models["old"].save_pretrained(tmp_path / "b")  # same config, another save
    (tmp_path / "b" / WEIGHTS_NAME).replace(tmp_path / "a" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="written by another save.*mixes two adapters"):
        read_adapter(tmp_path / "a")


# ------------------------------------------------------------------ 3. names
@pytest.mark.parametrize("name, message", [
    ("/tmp/elsewhere", "path separator"), ("a/b", "path separator"), ("..\\x", "'.'"), ("a\x00b", "control character"),
    ("x" * 300, "pick a shorter name"), ("__base__", "reserved"), ("", "non-empty"),
])
def test_adapter_names_are_one_folder_name(name, message, tmp_path):
    model = adapter(2, 0)
    with pytest.raises(ValueError, match=message):
        model.add_adapter(name, LoraConfig(r=2, target_modules=["c_attn"]))
    assert list(model.peft_config) == ["default"]
    model.save_pretrained(tmp_path / "out")
    assert not Path("/tmp/elsewhere").exists() or not (Path("/tmp/elsewhere") / CONFIG_NAME).exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == []


def test_adapter_names_as_a_string_is_refused():
    model = adapter(2, 0).eval()
    with pytest.raises(ValueError, match="one adapter name per batch row, got the string 'default'"):
        model(input_ids=torch.randint(0, 128, (7, 5)), adapter_names="default")


# ------------------------------------------------------------------ 4. safe merges, all or nothing
def poison(model: LoraModel, layer: int) -> None:
    """NaN in one lora_B entry of transformer layer `layer` (layers before it stay finite)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".h.{layer}." in name and "lora_B" in name:
                p.view(-1)[0] = float("nan")
                return
    raise AssertionError("no lora_B found")


def test_safe_merge_checks_every_layer_before_changing_any():
    model = adapter(2, 0)
    poison(model, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaNs or infs detected.*nothing was merged"):
        model.merge_adapter(safe_merge=True)
    for key, value in model.state_dict().items():  # layer 0 merged nothing either
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert not any(layer.merged for layer in model._lora_layers().values())


def test_safe_merge_and_unload_of_a_qlora_model_leaves_the_4bit_base():
    from minilora.quant import Linear4bit

    torch.manual_seed(0)
    base = make("llama")
    quantize_model(base, NF4Config(blocksize=64, double_quant=True), skip_modules=["lm_head"])
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False))
    with torch.no_grad():
        [p for n, p in model.named_parameters() if ".layers.1." in n and "lora_B" in n][0].view(-1)[0] = float("inf")
    n_4bit = sum(isinstance(m, Linear4bit) for m in model.modules())
    with pytest.raises(ValueError, match="nothing was merged"):
        model.merge_and_unload(safe_merge=True)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == n_4bit > 0


# ------------------------------------------------------------------ 5. non-finite numbers
@pytest.fixture
def saved(tmp_path):
    adapter(2, 0).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / MINILORA_CONFIG_NAME).unlink()  # adapter_config.json alone, as PEFT writes it
    return tmp_path / "a"


def edit_config(directory: Path, **changes) -> None:
    raw = json.loads((directory / CONFIG_NAME).read_text())
    raw.update(changes)
    (directory / CONFIG_NAME).write_text(json.dumps(raw))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_a_config_with_a_non_finite_alpha_is_refused_with_the_file_name(saved, value):
    text = (saved / CONFIG_NAME).read_text()
    raw = json.loads(text)
    raw["lora_alpha"] = value
    (saved / CONFIG_NAME).write_text(json.dumps(raw))  # json writes NaN / Infinity, as the probes did
    with pytest.raises(ValueError, match=f"{saved / CONFIG_NAME}: lora_alpha must be a finite number > 0"):
        LoraModel.from_pretrained(make("gpt2"), saved)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_tensors_are_refused(saved, bad):
    tensors = load_file(saved / WEIGHTS_NAME)
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key][0, 0] = bad
    save_file(tensors, saved / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=f"{saved / WEIGHTS_NAME}: 1 tensor.*NaN or infinite.*{key}"):
        LoraModel.from_pretrained(make("gpt2"), saved)


def test_infinite_adapter_weights_are_refused():
    model = adapter(2, 0).eval()
    with pytest.raises(ValueError, match="finite numbers"):
        model(input_ids=torch.randint(0, 128, (2, 5)), adapter_weights={"default": float("inf")})


# ------------------------------------------------------------------ 6. tiny input, huge memory
def test_a_config_asking_for_a_huge_rank_is_refused_before_allocating(saved):
    edit_config(saved, r=1_000_000, lora_alpha=8)
    assert sum(p.stat().st_size for p in saved.iterdir()) < 64_000
    code = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import make
from minilora import LoraModel
base = make("gpt2")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    LoraModel.from_pretrained(base, {str(saved)!r})
except ValueError as err:
    print("refused:", err)
print("peak_growth_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "refused:" in result.stdout and "asks for rank 1000000" in result.stdout, result.stderr[-2000:]
    growth = float(result.stdout.split("peak_growth_mb")[1])
    assert growth < 200, f"loading an 11 KB adapter grew the peak memory by {growth:.0f} MB"


# ------------------------------------------------------------------ 8. file modes
def test_files_get_the_usual_modes(tmp_path):
    old = os.umask(0o022)
    try:
        adapter(2, 0).save_pretrained(tmp_path / "a")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").iterdir()}
        assert modes == {name: 0o644 for name in modes} and len(modes) == 4
        from minilora.exporting import export

        model = adapter(2, 0)
        model.save_pretrained(tmp_path / "adapter")
        make("gpt2").save_pretrained(tmp_path / "base")
        export(tmp_path / "base", tmp_path / "adapter", out=tmp_path / "merged", print_report=False)
        assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "merged").iterdir()} == {0o644}
    finally:
        os.umask(old)


# ------------------------------------------------------------------ 10. unclear errors made clear
@pytest.mark.parametrize("field, value, message", [
    ("lora_alpha", "8", "lora_alpha must be a number, got '8'"),
    ("target_modules", 123, "target_modules must be a name, a regex, or a list of names"),
    ("rank_pattern", [1, 2], "rank_pattern must be a mapping"),
    ("r", 2.5, "r must be an integer"),
])
def test_config_fields_of_the_wrong_type_name_the_file_and_field(saved, field, value, message):
    edit_config(saved, **{field: value})
    with pytest.raises(ValueError, match=f"{saved / CONFIG_NAME}: {message}"):
        LoraModel.from_pretrained(make("gpt2"), saved)


@pytest.mark.parametrize("payload", [[torch.zeros(2)], {"a": [1, 2]}, torch.zeros(3)])
def test_a_bin_that_is_not_a_dict_of_tensors_names_the_file(saved, payload):
    (saved / WEIGHTS_NAME).unlink()
    torch.save(payload, saved / "adapter_model.bin")
    with pytest.raises(ValueError, match=f"{saved / 'adapter_model.bin'} holds a .*not a dict of named tensors"):
        LoraModel.from_pretrained(make("gpt2"), saved)
