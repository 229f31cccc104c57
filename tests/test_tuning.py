"""Kernel choices that persist (kernels/tuning_cache.py), their use by the dispatcher, tuning ahead
(kernels/tuning.py, nn/kernel_tuning.py) and `neural-quantize tune`."""

import json
from dataclasses import asdict

import pytest
import torch

from neural_quantization import QuantizationConfig, Quantizer
from neural_quantization.cli import main
from neural_quantization.kernels import dispatch, tuning, tuning_cache
from neural_quantization.kernels.dispatch import LaunchConfig
from neural_quantization.nn.kernel_tuning import model_layer_shapes
from conftest import tiny_model, tiny_tokens

HAS_CUDA = torch.cuda.is_available()
GPU = "NVIDIA Test GPU 80GB"


def _entry(m=1, K=4096, N=6144, symmetric=True, act_order=False, strategy="gemv_rows", us=5.0):
    config = LaunchConfig(strategy, 1, 512, 64, 4, 4, 1)
    return {"m": m, "K": K, "N": N, "dtype": "torch.float16", "bits": 4, "group_size": 128, "symmetric": symmetric,
            "act_order": act_order, "config": asdict(config), "us": us}


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(dispatch, "_TUNED", {})
    monkeypatch.setattr(dispatch, "_CHOSEN", {})
    monkeypatch.setattr(dispatch, "_PERSISTENT_LOADED", set())
    return tmp_path / "cache"


def test_user_cache_records_merge_and_round_trip(isolated_cache):
    path = tuning_cache.record(GPU, _entry(m=1))
    assert path == isolated_cache / f"NVIDIA_Test_GPU_80GB-nq{tuning_cache.__version__}.json"
    tuning_cache.record(GPU, _entry(m=16, us=9.0))
    tuning_cache.record(GPU, _entry(m=1, us=4.0))  # the same key again: replaced, not duplicated
    entries = tuning_cache.load(GPU)
    assert sorted((e["m"], e["us"]) for e in entries) == [(1, 4.0), (16, 9.0)]
    document = json.loads(path.read_text())
    assert document["format"] == tuning_cache.FORMAT and document["gpu"] == GPU
    assert not list(isolated_cache.glob("*.tmp"))  # written atomically, nothing left behind
    assert tuning_cache.load("Another GPU") == []  # one file per GPU model


def test_cache_can_be_switched_off_and_bad_files_are_ignored(isolated_cache, monkeypatch):
    path = tuning_cache.user_cache_file(GPU)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert tuning_cache.load(GPU) == []
    path.write_text(json.dumps({"format": 99, "entries": [_entry()]}))  # a future format: not read
    assert tuning_cache.load(GPU) == []
    monkeypatch.setenv(tuning_cache.ENV_CACHE, "off")
    assert tuning_cache.user_cache_file(GPU) is None and tuning_cache.record(GPU, _entry()) is None


def test_unwritable_cache_warns_once_and_never_fails(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(tuning_cache.ENV_CACHE, str(blocker / "sub"))  # a directory under a file: cannot exist
    monkeypatch.setattr(tuning_cache, "_write_warned", False)
    with pytest.warns(UserWarning, match="could not be saved"):
        assert tuning_cache.record(GPU, _entry()) is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure is silent
        assert tuning_cache.record(GPU, _entry()) is None


def test_user_cache_overrides_shipped_defaults(isolated_cache, tmp_path, monkeypatch):
    shipped = tmp_path / "shipped.json"
    tuning_cache.write_entries(shipped, GPU, [_entry(m=1, us=7.0), _entry(m=2, us=8.0)])
    monkeypatch.setattr(tuning_cache, "shipped_defaults_file", lambda name: shipped)
    tuning_cache.record(GPU, _entry(m=1, us=3.0))
    by_m = {}
    for entry in tuning_cache.load(GPU):  # later entries win, as the dispatcher reads them
        by_m[entry["m"]] = entry["us"]
    assert by_m == {1: 3.0, 2: 8.0}


def test_shipped_defaults_switch(monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV_DEFAULTS, "0")
    assert tuning_cache.shipped_defaults_file("NVIDIA H100 80GB HBM3") is None
    monkeypatch.delenv(tuning_cache.ENV_DEFAULTS)
    assert tuning_cache.shipped_defaults_file("No Such GPU") is None


def test_stored_configs_that_cannot_run_here_are_dropped():
    cpu = torch.device("cpu")
    assert dispatch._stored_config(_entry(), cpu) == LaunchConfig("gemv_rows", 1, 512, 64, 4, 4, 1)
    assert dispatch._stored_config(_entry(strategy="cuda_mma"), cpu) is None  # no CUDA extension on a CPU
    assert dispatch._stored_config(_entry(strategy="no_such_kernel"), cpu) is None
    unknown_field = _entry()
    unknown_field["config"]["warp_specialized"] = True  # written by a later version
    assert dispatch._stored_config(unknown_field, cpu) is None


def test_dispatch_uses_a_neighbouring_choice_before_the_heuristic(isolated_cache):
    x = torch.randn(1, 256, dtype=torch.float16)
    stored = LaunchConfig("gemv", 1, 64, 128, 2, 4, 3)
    # tuned symmetric without act-order; asked for asymmetric with act-order: the same kernels serve it
    dispatch._TUNED[(str(x.device), 1, 256, 512, "torch.float16", 4, 128, True, False)] = stored
    assert dispatch._stored_choice((str(x.device), 1, 256, 512, "torch.float16", 4, 128, False, True)) == stored
    assert dispatch._stored_choice((str(x.device), 2, 256, 512, "torch.float16", 4, 128, True, False)) is None
    qweight = torch.zeros(32, 512, dtype=torch.int32)
    scales = torch.ones(2, 512, dtype=torch.float16)
    chosen = dispatch.select_config(x, qweight, torch.zeros(2, 64, dtype=torch.int32), scales,
                                    torch.arange(256, dtype=torch.int32), None, 4, 128, 256, False)
    assert chosen == stored
    heuristic = dispatch.select_config(torch.randn(2, 256, dtype=torch.float16), qweight,
                                       torch.zeros(2, 64, dtype=torch.int32), scales, None, None, 4, 128, 256, True)
    assert heuristic == dispatch.default_config(2, 256, 512, 4, dispatch._sm_count(x.device), 128)


def test_on_the_spot_tuning_is_off_by_default(monkeypatch):
    monkeypatch.delenv("NQ_KERNEL_AUTOTUNE", raising=False)
    assert not dispatch.autotune_enabled()
    with dispatch.tuning_on_the_spot():
        assert dispatch.autotune_enabled()
        with dispatch.tuning_on_the_spot(False):
            assert not dispatch.autotune_enabled()
    monkeypatch.setenv("NQ_KERNEL_AUTOTUNE", "1")
    assert dispatch.autotune_enabled()


def test_layer_shape_kernel_group():
    assert tuning.LayerShape(4096, 1024).kernel_group_size() == 128
    assert tuning.LayerShape(4096, 1024, group_size=-1).kernel_group_size() == 4096 + 8
    assert tuning.LayerShape(4096, 1024, bits=8, group_size=4096).kernel_group_size() == 4096 + 4
    assert tuning.LayerShape(64, 96, 4, 32, False, True).describe() == "64->96 w4 g32 asym act-order"


def test_model_layer_shapes_lists_each_layer_and_each_fused_group():
    config = QuantizationConfig(bits=4, group_size=32, calibration_batch_size=4, desc_act=True, static_groups=False,
                                sym=False)  # dynamic groups: g_idx follows the act-order permutation
    model, _ = Quantizer(config).quantize_model(tiny_model("mistral"), tiny_tokens())
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    kv = model.config.num_key_value_heads * (hidden // model.config.num_attention_heads)
    shapes = model_layer_shapes(model)
    sizes = [(s.in_features, s.out_features) for s in shapes]
    assert set(sizes) == {(hidden, hidden), (hidden, kv), (hidden, inter), (inter, hidden), (hidden, hidden + 2 * kv),
                          (hidden, 2 * inter)}
    assert len(sizes) == len(set(sizes))  # distinct
    assert all(s.act_order and not s.symmetric and s.group_size == 32 for s in shapes)
    plain = model_layer_shapes(model, fused=False)
    assert {(s.in_features, s.out_features) for s in plain} == {(hidden, hidden), (hidden, kv), (hidden, inter),
                                                                (inter, hidden)}


def test_tune_command_without_a_gpu_says_so(tiny_model_dir, capsys):
    if HAS_CUDA:
        pytest.skip("this machine has a GPU")
    assert main(["tune", str(tiny_model_dir)]) == 2
    assert "NVIDIA GPU" in capsys.readouterr().err


def test_tune_command_help(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    out = capsys.readouterr().out
    assert "--tokens" in out and "--retune" in out and "NQ_TUNING_CACHE" in out


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_tuned_choices_persist_across_processes(isolated_cache):
    shape = tuning.LayerShape(1024, 768, 4, 128, True, False)
    rows = tuning.tune_shapes([shape], (1, 16), (torch.float16,))
    assert [row["M"] for row in rows] == [1, 16] and all(row["tuned_us"] > 0 for row in rows)
    assert all(row["heuristic_us"] >= 0.9 * row["tuned_us"] for row in rows)  # the tuned one is the fastest timed
    entries = tuning_cache.load(torch.cuda.get_device_name())
    assert {(e["m"], e["K"], e["N"]) for e in entries} >= {(1, 1024, 768), (16, 1024, 768)}
    assert tuning.tune_shapes([shape], (1, 16), (torch.float16,)) == []  # stored: skipped
    tuned = dict(dispatch._TUNED)
    # a new process: the in-process table is empty, the file restores the same choices
    dispatch._TUNED.clear()
    dispatch._PERSISTENT_LOADED.clear()
    assert dispatch.load_stored_choices(torch.device("cuda")) >= 2
    assert all(dispatch._TUNED[key] == config for key, config in tuned.items())
