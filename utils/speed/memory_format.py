"""The memory format a model's 4-D input runs in: a fixed rule of network and device, never a clock."""
import torch

from utils.speed.folding import CONV_CALLS

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# Where channels-last has native convolution kernels (oneDNN, cuDNN); elsewhere (e.g. MPS) the rule stays contiguous.
CHANNELS_LAST_DEVICES = ("cpu", "cuda")


def convolves_in_2d(net):
    """Does `net` hold a 2-D convolution: an nn.Conv2d (or a TorchScript one), or a conv2d call in a traced graph
    (torch.fx, as after fold_batch_norms, or a torch.export program)?"""
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d) or getattr(module, "original_name", None) == "Conv2d":
            return True
        graph = getattr(module, "graph", None)
        if isinstance(graph, torch.fx.Graph) and any(node.op == "call_function" and node.target in CONV_CALLS
                                                     for node in graph.nodes):
            return True
    return False


def memory_format_rule(net, device):
    """The memory format 4-D input runs in, a pure function of the network and the device (the same for every
    precision): channels-last for 2-D convolutions on CPU (oneDNN) and CUDA (cuDNN), whose kernels run NHWC
    natively, contiguous otherwise. The benchmark's measurements on this CPU favour channels-last for both models,
    batch sizes and precisions; where they did not, the loss was within noise."""
    if torch.device(device).type in CHANNELS_LAST_DEVICES and convolves_in_2d(net):
        return torch.channels_last
    return torch.contiguous_format


def memory_format_of(model, device):
    """The name of the memory format `model` (a Classifier) runs its 4-D input in on `device`: forced, or the rule's."""
    size = model.preprocessing.crop_size
    return format_name(model.format_for(torch.zeros(1, 3, size, size, device=device)))


def format_name(memory_format):
    return {value: key for key, value in MEMORY_FORMATS.items()}.get(memory_format, str(memory_format))
