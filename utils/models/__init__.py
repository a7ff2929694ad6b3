"""Classifiers: the wrapper every step attacks, where models come from, what their outputs are called, and how a
model is written to a file.

- `classifier.py`: `Classifier` (pixels in [0, 1] in, logits out, normalization inside), `Preprocessing`, the 8-bit
  image a model sees for a file (`prepare_image`), predictions.
- `load.py`: `load_model`, the one entry point (a torchvision name, efficientnet_lite0, FILE.pt2 / FILE.pt,
  timm:NAME, robustbench:DATASET/THREAT/NAME).
- `zoo.py`: torchvision, EfficientNet-Lite0, timm and RobustBench through their own loaders and caches.
- `model_files.py`: .pt2 and .pt files, read without unpickling; `load_program`, the one checked .pt2 loader.
- `labels.py`: class names (ImageNet's label map, class-list files, the one sidecar path `classes_path`), and
  `find_class` / `get_label` between names and indices.
- `export.py`: `export_program`, the one exporter to .pt2.
- `guards.py`: weights-only loading, and libraries kept quiet so that a failure is one line.
"""
from utils.models.classifier import (Classifier, Preprocessing, freeze, get_image_transform, predict, predict_images,
                                     prepare_image, prepare_images, weights_digest)
from utils.models.export import Normalized, export_program, normalized
from utils.models.labels import (CIFAR10_CLASSES, DEFAULT_TARGET, IMAGENET_LABELS, classes_path, default_classes,
                                 find_class,
                                 get_idx_to_label, get_label, imagenet_classes, model_classes, read_classes)
from utils.models.load import DEFAULT_MODEL, load_model, load_named
from utils.models.model_files import PROBE_SIZE, is_model_file, load_program
from utils.models.zoo import (OFFLINE_MODEL, ROBUSTBENCH_PREFIX, TIMM_PREFIX, load_efficientnet_lite0,
                              load_torchvision, torchvision_classifiers)
