"""Out-of-memory and cancel exceptions reach the caller as themselves; error summaries never touch a device."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fluxion.layers as fl
from fluxion.layers.module import tensor_summary
from nodes.host import Cancelled

# torch >= 2.5 has torch.OutOfMemoryError, the same class as torch.cuda.OutOfMemoryError.
OUT_OF_MEMORY_TYPES = list(
    dict.fromkeys([torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", MemoryError), MemoryError])
)


class RecordedOps(TorchDispatchMode):
    """Records every aten operation dispatched while active (allocations included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def nested_model_raising(error: BaseException) -> fl.Chain:
    """The error is raised three Chains deep, inside a Sum, after a real weighted layer ran."""

    def fail(x: torch.Tensor) -> torch.Tensor:
        raise error

    return fl.Chain(fl.Linear(2, 2), fl.Chain(fl.Sum(fl.Identity(), fl.Chain(fl.Lambda(fail)))))


@pytest.mark.parametrize("error_type", OUT_OF_MEMORY_TYPES, ids=lambda error_type: error_type.__name__)
def test_out_of_memory_inside_a_nested_chain_reaches_the_caller_as_itself(error_type):
    error = error_type("CUDA out of memory. Tried to allocate 2.00 GiB")
    model = nested_model_raising(error)
    with pytest.raises(error_type) as caught:
        model(torch.ones(1, 2))
    assert caught.value is error and not isinstance(caught.value, fl.ChainError)
    assert caught.value.__cause__ is None
    # The place in the tree is noted once, by the innermost Chain.
    assert caught.value.__notes__ == [
        "fluxion: raised in Chain.Chain.Sum.Chain.Lambda (a Lambda, state-dict key 'Chain.Sum.Chain.Lambda')"
    ]


def test_cuda_out_of_memory_from_a_weighted_layer_is_what_comfyui_catches():
    model = fl.Chain(fl.Chain(fl.Linear(2, 2), fl.Chain(fl.Linear(2, 2))))
    error = torch.cuda.OutOfMemoryError("CUDA out of memory")

    def out_of_memory(module, args):  # noqa: ANN001, ANN202
        raise error

    model.Chain.Chain.Linear.register_forward_pre_hook(out_of_memory)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the exact type is what the test checks
        model(torch.ones(1, 2))
    assert isinstance(caught.value, torch.cuda.OutOfMemoryError)  # ComfyUI's OOM_EXCEPTION check
    assert caught.value is error
    assert "state-dict key 'Chain.Chain.Linear'" in caught.value.__notes__[0]


@pytest.mark.parametrize("cancel_type", [Cancelled, KeyboardInterrupt])
def test_cancel_inside_a_nested_chain_reaches_the_caller_as_itself_without_notes(cancel_type):
    cancel = cancel_type("processing was cancelled")
    with pytest.raises(cancel_type) as caught:
        nested_model_raising(cancel)(torch.ones(1, 2))
    assert caught.value is cancel and not isinstance(caught.value, fl.ChainError)
    assert getattr(caught.value, "__notes__", None) is None


def test_other_errors_are_still_located_in_a_chain_error():
    error = ValueError("bad input")
    with pytest.raises(fl.ChainError, match="Chain.Chain.Sum.Chain.Lambda") as caught:
        nested_model_raising(error)(torch.ones(1, 2))
    assert caught.value.__cause__ is error


def test_summary_of_a_tensor_off_the_cpu_runs_no_tensor_operation():
    on_meta = torch.empty(2, 4, 64, 64, dtype=torch.float16, device="meta")  # stands in for a GPU tensor
    with RecordedOps() as recorded:
        text = tensor_summary(on_meta)
    assert recorded.ops == []  # nothing allocated, copied or reduced
    assert text == "Tensor(shape=(2, 4, 64, 64), dtype=torch.float16, device=meta)"


def test_summary_of_a_cpu_tensor_has_statistics_without_a_float_copy():
    on_cpu = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.bfloat16)
    with RecordedOps() as recorded:
        text = tensor_summary(on_cpu)
    assert recorded.ops  # the recorder sees the reductions, so the test above could fail
    assert not any("_to_copy" in op or "to.dtype" in op for op in recorded.ops)
    assert "min=1, max=6, mean=3" in text
    assert "min=1, max=3, mean=2" in tensor_summary(torch.tensor([1, 2, 3]))
    sparse = torch.eye(3).to_sparse()  # no min/max kernels: described by layout, never an error
    assert tensor_summary(sparse) == "Tensor(shape=(3, 3), dtype=torch.float32, device=cpu)"


def test_chain_error_on_a_meta_input_describes_it_by_layout():
    model = fl.Chain(fl.Linear(4, 4, device="meta"), fl.Linear(5, 4, device="meta"))
    with pytest.raises(fl.ChainError) as caught:
        model(torch.empty(3, 4, device="meta"))
    message = str(caught.value)
    assert "input 0: Tensor(shape=(3, 4), dtype=torch.float32, device=meta)" in message
    assert "Chain.Linear_2" in message and "mean=" not in message
