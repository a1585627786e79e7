"""CUDAGraphed: a plain call without CUDA; on CUDA one graph per call signature, static input
buffers, outputs cloned, re-capture when the weights move. The bookkeeping is tested on the
CPU by standing in for the capture with a function that behaves like a graph (it reads the
static inputs and writes the static outputs on every replay); the real capture runs in the GPU
test at the end."""

import pytest
import torch
from torch import nn

from onestep_kernels import cuda_graph
from onestep_kernels.cuda_graph import CUDAGraphed, graph_networks

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5))
        self.register_buffer("shift", torch.randn(5))

    def forward(self, x, t, scale=1.0):
        return {"out": scale * x * self.weight + self.shift + t[:, None], "t": t * 2}


@pytest.fixture
def emulated(monkeypatch):
    """Stand-in capture on the CPU; returns the list of captured call signatures."""
    captures = []

    def capture(fn, static_args, warmup, pool):
        captures.append(cuda_graph._key(tuple(static_args)))
        for _ in range(warmup):
            fn(*static_args)
        static_out = fn(*static_args)

        def replay():
            fresh = fn(*static_args)
            for k in static_out:
                static_out[k].copy_(fresh[k])
        return replay, static_out

    monkeypatch.setattr(cuda_graph, "_capture", capture)
    monkeypatch.setattr(CUDAGraphed, "_uses_graph", lambda self, args: self.enabled)
    monkeypatch.setattr(CUDAGraphed, "pool", property(lambda self: "pool"))
    return captures


def test_plain_call_without_cuda():
    net = Affine()
    graphed = CUDAGraphed(net)
    x, t = torch.randn(3, 5), torch.rand(3)
    out = graphed(x, t)
    torch.testing.assert_close(out["out"], net(x, t)["out"], rtol=0, atol=0)
    assert graphed.num_graphs == 0
    assert out["out"].requires_grad  # a plain call: autograd as usual


def test_one_graph_per_signature_and_static_inputs(emulated):
    net = Affine()
    graphed = CUDAGraphed(net)
    for batch in (3, 3, 4, 3):
        x, t = torch.randn(batch, 5), torch.rand(batch)
        out = graphed(x, t)
        with torch.no_grad():
            expected = net(x, t)
        torch.testing.assert_close(out["out"], expected["out"], rtol=0, atol=0)
        torch.testing.assert_close(out["t"], expected["t"], rtol=0, atol=0)
    assert len(emulated) == 2 and graphed.num_graphs == 2
    graphed(torch.randn(3, 5), torch.rand(3), 2.0)  # a non-tensor argument is part of the key
    assert len(emulated) == 3


def test_outputs_are_cloned_unless_asked(emulated):
    x, t = torch.randn(3, 5), torch.rand(3)
    graphed = CUDAGraphed(Affine())
    first = graphed(x, t)["out"]
    kept = first.clone()
    graphed(torch.randn(3, 5), torch.rand(3))
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    raw = CUDAGraphed(Affine(), clone_outputs=False)
    a = raw(x, t)["out"]
    b = raw(torch.randn(3, 5), t)["out"]
    assert a.data_ptr() == b.data_ptr()


def test_recaptures_when_weights_move(emulated):
    net = Affine()
    graphed = CUDAGraphed(net)
    x, t = torch.randn(3, 5), torch.rand(3)
    graphed(x, t)
    with torch.no_grad():
        net.weight.mul_(2)  # in place: the same graph sees it
    torch.testing.assert_close(graphed(x, t)["out"], net(x, t)["out"].detach(), rtol=0, atol=0)
    assert len(emulated) == 1
    net.double().float()  # new storage for every weight
    torch.testing.assert_close(graphed(x, t)["out"], net(x, t)["out"].detach(), rtol=0, atol=0)
    assert len(emulated) == 2
    graphed.reset()
    graphed(x, t)
    assert len(emulated) == 3


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="net"):
        CUDAGraphed(3)
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphed(Affine(), warmup=0)


def test_graph_networks_wraps_each_child_once():
    from onestep_models.direct import DirectModel

    model = DirectModel(nn.Linear(2, 2), nn.Linear(2, 2))
    assert graph_networks(model, enabled=False).v.__class__ is nn.Linear
    graph_networks(model)
    graph_networks(model)
    assert isinstance(model.v, CUDAGraphed) and isinstance(model.w, CUDAGraphed)
    assert isinstance(model.v.net, nn.Linear)


@cuda
@pytest.mark.parametrize("fused", [False, True])
def test_graph_replays_a_flow_dit_on_gpu(fused):
    from onestep_models import flow
    from onestep_models.dit import FlowDiT

    torch.manual_seed(0)
    model = FlowDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=96, depth=2,
                    num_heads=4, num_classes=10, fused=fused).cuda().eval()
    for p in model.parameters():  # adaLN-Zero starts as the identity: make the blocks work
        p.data.normal_(0, 0.05)
    graphed = CUDAGraphed(model)
    x0 = torch.randn(3, 4, 8, 8, device="cuda")
    y = torch.tensor([1, 2, 3], device="cuda")
    with torch.no_grad():
        expected = flow.euler(model, x0, 4, y)
    got = flow.euler(graphed, x0, 4, y)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert graphed.num_graphs == 1
