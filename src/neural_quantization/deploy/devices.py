"""Edge and desktop devices the deployment report checks a model against.

Each device has its total memory and the part of it a model can use (``usable_bytes``), and the
format / runtime that runs quantized weights fast on it:

* GPTQ (or compressed-tensors) with vLLM's Marlin kernels, or our Triton kernels, needs an NVIDIA
  GPU of compute capability 8.0 or newer (Ampere: RTX 30xx, Jetson Orin; Ada: RTX 40xx).
* Everywhere else (Maxwell / Volta Jetsons, Apple silicon, plain CPUs) the int4 CUDA kernels do not
  run, and llama.cpp with a GGUF file does (CUDA, Metal or CPU backends).

Usable memory (assumptions, stated so the numbers can be checked):

* discrete GPUs: all of the VRAM (the CUDA context and the runtime are in the report's overhead);
* Jetson boards share RAM with the OS: total minus 1 GiB for L4T (a headless system);
* Apple silicon: Metal lets the GPU wire about two thirds of RAM on 8-16 GB machines
  (``recommendedMaxWorkingSetSize``); llama.cpp keeps the model there;
* a CPU box: total minus 2 GiB for the OS and other processes.
"""

from __future__ import annotations

from dataclasses import dataclass

from neural_quantization.formats.units import GIB


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    usable_bytes: int
    accelerator: str  # what runs the matmuls
    compute_capability: str | None  # NVIDIA only
    format: str  # "gptq" or "gguf": the checkpoint to deploy
    runtime: str
    why: str

    @property
    def usable_note(self) -> str:
        return f"{self.usable_bytes / GIB:.1f} of {self.memory_bytes / GIB:.0f} GiB usable"


def _gpu(name: str, gib: int, cc: str) -> Device:
    return Device(name, gib * GIB, gib * GIB, "NVIDIA GPU", cc, "gptq", "vLLM (GPTQ-Marlin) or neural-quantization",
                  f"compute capability {cc} (Ampere or newer): Marlin / Triton int4 kernels run")


DEVICES: tuple[Device, ...] = (
    Device("Jetson Nano 4 GB", 4 * GIB, 3 * GIB, "Maxwell GPU (shared RAM)", "5.3", "gguf", "llama.cpp (CUDA or CPU)",
           "Maxwell (5.3): no int4 tensor-core kernels (Marlin needs 8.0); llama.cpp runs GGUF"),
    Device("Jetson Xavier NX 8 GB", 8 * GIB, 7 * GIB, "Volta GPU (shared RAM)", "7.2", "gguf", "llama.cpp (CUDA)",
           "Volta (7.2): below Marlin's 8.0; llama.cpp's CUDA backend runs GGUF"),
    Device("Jetson Orin Nano 8 GB", 8 * GIB, 7 * GIB, "Ampere GPU (shared RAM)", "8.7", "gptq",
           "vLLM (GPTQ-Marlin) or neural-quantization", "Ampere (8.7): Marlin / Triton int4 kernels run"),
    _gpu("RTX 3060 12 GB", 12, "8.6"),
    _gpu("RTX 4090 24 GB", 24, "8.9"),
    Device("Apple M1 8 GB", 8 * GIB, 8 * GIB * 2 // 3, "Apple GPU (Metal, unified memory)", None, "gguf",
           "llama.cpp (Metal)", "no CUDA: llama.cpp's Metal backend runs GGUF"),
    Device("Apple M1 16 GB", 16 * GIB, 16 * GIB * 2 // 3, "Apple GPU (Metal, unified memory)", None, "gguf",
           "llama.cpp (Metal)", "no CUDA: llama.cpp's Metal backend runs GGUF"),
    Device("CPU box 16 GB", 16 * GIB, 14 * GIB, "CPU", None, "gguf", "llama.cpp (CPU)",
           "no GPU: llama.cpp's CPU backend runs GGUF"),
)


def find_device(name: str) -> Device:
    for device in DEVICES:
        if device.name.lower() == name.lower():
            return device
    raise KeyError(f"unknown device {name!r}; known: {[d.name for d in DEVICES]}")
