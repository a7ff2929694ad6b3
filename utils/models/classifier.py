"""The classifier every step attacks: RGB pixels in [0, 1] in, logits out, the network's normalization inside (so
attacks and defenses work on pixels, and an epsilon of 10 means 10 levels out of 255); what it expects of an image
(`Preprocessing`), the 8-bit image it sees for a file (`prepare_image`), and its predictions.
"""
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision import transforms

from utils import speed
from utils.cli import UsageError
from utils.images import load_image, to_tensor
from utils.models.labels import imagenet_classes


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects: the short side resized to `resize_size` (default: `crop_size`), a square centre crop of
    `crop_size` (None: the image as it is, for a model file given no --input-size), normalized by `mean` and `std`
    (per RGB channel)."""
    crop_size: int | None
    mean: tuple
    std: tuple
    interpolation: transforms.InterpolationMode = transforms.InterpolationMode.BILINEAR
    resize_size: int | None = None


def get_image_transform(preprocessing):
    """The tutorial's transform, up to the 8-bit image: Resize(crop) then CenterCrop(crop), so the short side is kept
    whole (a zoo model's own resize, e.g. timm's crop_pct, where it has one). Normalization is left to the model, so
    the attack's budget is in pixel levels."""
    size = preprocessing.crop_size
    if size is None:
        return transforms.Compose([])
    return transforms.Compose([transforms.Resize(preprocessing.resize_size or size, interpolation=preprocessing.interpolation),
                               transforms.CenterCrop(size)])


def prepare_image(path, model):
    """The 8-bit HxWx3 array the model sees for the file at `path`: loaded, resized and centre-cropped."""
    return np.asarray(get_image_transform(model.preprocessing)(load_image(path)), dtype=np.uint8).copy()


def prepare_images(paths, model):
    """The arrays the model sees for several files, which a batch needs to share one size: a model that takes
    images as they are (a model file given no --input-size) would get several sizes otherwise."""
    images = [prepare_image(path, model) for path in paths]
    for path, image in zip(paths, images):
        if image.shape != images[0].shape:
            raise UsageError(f"{path} is {image.shape[1]}x{image.shape[0]} but {paths[0]} is {images[0].shape[1]}x"
                             f"{images[0].shape[0]}: {model.name} takes images as they are; pass `input_size` N to "
                             "resize and crop them all to N x N", "input_size")
    return images


class InFormat(torch.autograd.Function):
    """`tensor` in `memory_format` (the same values), whose gradient comes back in the tensor's own layout: the
    gradient of .contiguous(memory_format) would stay channels-last, and every attack's arithmetic on it and on its
    contiguous images would take PyTorch's slow mixed-layout paths (a third of APGD-L2's projection)."""

    @staticmethod
    def forward(ctx, tensor, memory_format):
        ctx.layout = torch.channels_last if tensor.is_contiguous(memory_format=torch.channels_last) and \
            not tensor.is_contiguous() else torch.contiguous_format
        return tensor.contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.layout), None


class Classifier(nn.Module):
    """A classifier on RGB pixels in [0, 1]: normalization happens inside, so gradients are in pixel space. `classes`
    names its outputs (default: ImageNet's 1000).

    `memory_format` is "auto" (the default: utils.speed.memory_format_rule, a fixed function of the network and the
    device, never a timing, so a run's bytes do not depend on how busy the machine is) or a torch.memory_format to
    force. The input and the weights are put in the chosen format: the same function, computed in other floats."""

    def __init__(self, net, preprocessing, name="model", memory_format="auto", classes=None):
        super().__init__()
        self.net = net
        self.preprocessing = preprocessing
        self.name = name
        self.classes = tuple(classes) if classes is not None else imagenet_classes()
        self.memory_format = memory_format
        self.rule_formats = {}  # device -> utils.speed.memory_format_rule's answer, found once
        self.weights_format = torch.contiguous_format
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1))

    def format_for(self, pixels):
        """The memory format this input runs in: forced, or the rule's for this network and the input's device."""
        if self.memory_format != "auto":
            return self.memory_format
        if pixels.device not in self.rule_formats:
            self.rule_formats[pixels.device] = speed.memory_format_rule(self.net, pixels.device)
        return self.rule_formats[pixels.device]

    def forward_in(self, pixels, memory_format):
        # normalized before the change of format: the same values, and broadcasting the (1, 3, 1, 1) mean over a
        # channels-last batch is about 8x slower than over a contiguous one (7% of a digits forward)
        normalized = (pixels - self.mean) / self.std
        if pixels.dim() == 4:
            if memory_format != self.weights_format:  # only when the choice changes, e.g. with the batch size
                self.net.to(memory_format=memory_format)
                self.weights_format = memory_format
            if not normalized.is_contiguous(memory_format=memory_format):
                # only where the format changes: InFormat given a tensor already in it returns its input, which
                # torch.export records as a view_as that the exact verifier cannot encode (a change exports as a copy)
                normalized = InFormat.apply(normalized, memory_format)
        return self.net(normalized)

    def forward(self, pixels):
        return self.forward_in(pixels, self.format_for(pixels))

    def with_net(self, net, memory_format=None):
        """The same classifier (preprocessing, name, device) around another network, e.g. a compiled one."""
        twin = Classifier(net, self.preprocessing, self.name, self.memory_format if memory_format is None else memory_format,
                          self.classes)
        twin.weights_format = self.weights_format
        return twin.to(self.mean.device)


def weights_digest(model):
    """A short digest of `model`'s weights and buffers (names, dtypes, shapes and values, whatever their memory
    format): what says that two runs used the same model, wherever its file lay."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def freeze(model):
    """Eval mode and no gradients for the weights: attacks only need gradients for the input."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@torch.no_grad()
def predict(model, batch):
    """Class probabilities (B, C) for a float batch in [0, 1]."""
    return model(batch.to(model.mean.device)).softmax(dim=1)


def predict_images(model, images_u8):
    """Top-1 class index for each 8-bit image."""
    return predict(model, to_tensor(images_u8)).argmax(dim=1).tolist()

