"""Work directories, resume, and runs that stream the decoder layers from disk (issue 7), on CPU.

* an interrupted run resumed from its work directory writes bit-identical tensors to an
  uninterrupted run, and a work directory of another run is refused;
* a run streaming its layers from a safetensors checkpoint writes the same tensors (as shards with
  an index) as an in-memory run, and the sharded checkpoint loads back;
* streaming keeps the peak host memory under a stated bound (measured in a subprocess).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_model, tiny_tokens
from transformers import AutoModelForCausalLM, LlamaConfig

from neural_quantization import QuantizationConfig, Quantizer, load_quantized
from neural_quantization.models.layer_storage import INDEX_FILE, CheckpointWeights, WorkDirError

LAYERS = 4  # more than conftest's tiny decoder has: a resumed run has finished layers to skip
CONFIG = QuantizationConfig(bits=4, group_size=32, calibration_batch_size=4, device="cpu")


def four_layer_model():
    return tiny_model(num_hidden_layers=LAYERS)


def checkpoint_state(directory) -> dict[str, torch.Tensor]:
    weights = CheckpointWeights(directory)
    return weights.read(weights.names())


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


class Interrupt(Exception):
    pass


def stop_after(layers: int):
    def on_layer_done(done: int, total: int) -> None:
        if done == layers:
            raise Interrupt

    return on_layer_done


@pytest.mark.parametrize("device,gptaq", [("cpu", False), ("cpu", True)]
                         + ([("cuda", False)] if torch.cuda.is_available() else []))
def test_resumed_run_writes_the_same_checkpoint_as_an_uninterrupted_one(tmp_path, device, gptaq):
    """With ``gptaq`` the resumed run also rebuilds the float model's stream from the float layers."""
    reference = four_layer_model()
    ids = tiny_tokens()
    config = CONFIG.replace(device=device, gptaq=gptaq)
    model, results = Quantizer(config).quantize_model(copy.deepcopy(reference), ids, model_name="tiny",
                                                      work_dir=tmp_path / "work-a")
    model.save_pretrained(tmp_path / "uninterrupted")

    with pytest.raises(Interrupt):
        Quantizer(config).quantize_model(copy.deepcopy(reference), ids, model_name="tiny",
                                         work_dir=tmp_path / "work-b", on_layer_done=stop_after(2))
    assert sorted(os.listdir(tmp_path / "work-b" / "layers")) == [
        "layer-00000.json", "layer-00000.safetensors", "layer-00001.json", "layer-00001.safetensors"]
    solved = []
    resumed, resumed_results = Quantizer(config).quantize_model(
        copy.deepcopy(reference), ids, model_name="tiny", work_dir=tmp_path / "work-b", resume=True,
        on_layer_done=lambda done, total: solved.append(done),
    )
    resumed.save_pretrained(tmp_path / "resumed")

    assert_same_tensors(checkpoint_state(tmp_path / "uninterrupted"), checkpoint_state(tmp_path / "resumed"))
    assert [r["loss"] for r in resumed_results.layers] == [r["loss"] for r in results.layers]
    assert solved == [1, 2, 3, 4]


def test_work_directory_of_another_run_is_refused(tmp_path):
    ids = tiny_tokens()
    Quantizer(CONFIG).quantize_model(four_layer_model(), ids, model_name="tiny", work_dir=tmp_path / "work")
    with pytest.raises(WorkDirError, match="--resume"):  # reuse without resume
        Quantizer(CONFIG).quantize_model(four_layer_model(), ids, model_name="tiny", work_dir=tmp_path / "work")
    with pytest.raises(WorkDirError, match="calibration_sha256"):  # other calibration tokens
        Quantizer(CONFIG).quantize_model(four_layer_model(), tiny_tokens(seed=2), model_name="tiny",
                                         work_dir=tmp_path / "work", resume=True)
    with pytest.raises(ValueError, match="work_dir"):
        Quantizer(CONFIG).quantize_model(four_layer_model(), ids, model_name="tiny", resume=True)


@pytest.mark.parametrize("gptaq", [False, True])
def test_streamed_run_writes_the_in_memory_runs_tensors_as_shards(tmp_path, gptaq):
    source = tmp_path / "float-model"
    four_layer_model().save_pretrained(source)
    from conftest import make_tiny_tokenizer

    make_tiny_tokenizer().save_pretrained(source)
    ids = tiny_tokens()
    config = CONFIG.replace(gptaq=gptaq)  # gptaq: the float copy of each streamed layer is read from disk too

    in_memory, _ = Quantizer(config).quantize_model(str(source), ids)
    in_memory.save_pretrained(tmp_path / "in-memory")
    streamed, results = Quantizer(config).quantize_model(str(source), ids, stream_weights=True,
                                                        work_dir=tmp_path / "work")
    assert all(p.is_meta for p in streamed.model.layers.parameters())  # nothing of the layers stayed in memory
    streamed.save_pretrained(tmp_path / "streamed")

    index = json.loads((tmp_path / "streamed" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == LAYERS + 1
    assert_same_tensors(checkpoint_state(tmp_path / "in-memory"), checkpoint_state(tmp_path / "streamed"))
    assert results.size_bytes["quantized"] == sum(t.numel() * t.element_size()
                                                  for t in checkpoint_state(tmp_path / "streamed").values())
    loaded = load_quantized(tmp_path / "streamed")
    reference = load_quantized(tmp_path / "in-memory")
    assert torch.equal(loaded(ids[:2]).logits, reference(ids[:2]).logits)


# A model scaled up in width, so that its layers dominate the process's memory.
WIDE = dict(vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=8, max_position_embeddings=64)

MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from neural_quantization import QuantizationConfig, Quantizer

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    warm, source, work, output, stream = sys.argv[1:5] + [sys.argv[5] == "1"]
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    config = QuantizationConfig(bits=4, group_size=128, calibration_batch_size=4, device="cpu")
    # A first run on a tiny model loads every module and kernel, so the baseline excludes them.
    Quantizer(config).quantize_model(warm, ids, stream_weights=stream, work_dir=work + "-warm")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = rss("VmRSS:")
    model, _ = Quantizer(config).quantize_model(source, ids, stream_weights=stream, work_dir=work)
    model.save_pretrained(output)
    print(json.dumps({"peak_increase": rss("VmHWM:") - before}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak memory")
def test_streaming_keeps_peak_host_memory_near_one_layer(tmp_path):
    """Bound: while a streamed run quantizes and saves, its host memory grows by less than
    4 decoder layers' float weights (the layer, its float copy for GPTAQ, its dequantized
    calibration copy, its packed copy) + 6 of its largest Hessians (fp32 K×K: the Hessian, GPTAQ's
    cross term and target, the solver's Cholesky work) + 64 MiB, whatever the number of layers;
    the in-memory run holds all 8 layers, so streaming saves at least half of them.

    glibc keeps freed large blocks for reuse, which makes RSS a measure of the allocator's history;
    MALLOC_MMAP_THRESHOLD_ makes large blocks go back to the system when freed, so the peak RSS
    measures live memory.
    """
    from conftest import make_tiny_tokenizer

    torch.manual_seed(0)
    for name, config in (("wide", WIDE), ("warm", {**WIDE, "hidden_size": 64, "intermediate_size": 64,
                                                    "num_hidden_layers": 1})):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config))
        model.save_pretrained(tmp_path / name)
        make_tiny_tokenizer().save_pretrained(tmp_path / name)
        if name == "wide":
            layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
            model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hessian_bytes = WIDE["intermediate_size"] ** 2 * 4
    del model

    def peak(stream: bool) -> int:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        tag = "streamed" if stream else "in-memory"
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(tmp_path / "warm"), str(tmp_path / "wide"),
             str(tmp_path / f"work-{tag}"), str(tmp_path / tag), "1" if stream else "0"],
            capture_output=True, text=True, env=env, check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_increase"]

    streamed = peak(True)
    in_memory = peak(False)
    assert streamed < 4 * layer_bytes + 6 * hessian_bytes + 64 * 2**20, (streamed, layer_bytes)
    assert in_memory > model_bytes * 0.9  # the comparison is meaningful: the whole model was in memory
    assert in_memory - streamed > 4 * layer_bytes
