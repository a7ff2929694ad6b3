"""What every certifier of step 10 is: a name, the norms it covers, its own command-line flags and certified.csv
columns, and `certify(image, label, epsilons)` that gives one row per epsilon (or one row, for a certifier without
epsilons, such as randomized smoothing).

A row is a dict with "epsilon" (the budget, "" for a certifier without epsilons), "verdict" (one of the certifier's
VERDICTS), "prediction" (the model's class for the clean image), "seconds" (this verdict's time), each of the
certifier's `columns`, and "counterexample": None or the 8-bit (H, W, 3) image that the model classifies wrong
within the budget, which utils.certify.run saves as a PNG, reads back and checks.
"""
from dataclasses import asdict, dataclass, is_dataclass

from utils.models import weights_digest

ROBUST, NOT_ROBUST, UNKNOWN, MISCLASSIFIED = "robust", "not robust", "unknown", "misclassified"


@dataclass(frozen=True)
class Settings:
    """A certifier's settings, made by its `from_options` classmethod (subclass it)."""


class Certifier:
    name = ""
    norms = ("Linf", "L1")      # the budgets it certifies: "Linf" (levels out of 255), "L1", "L2" ([0, 1] units)
    uses_epsilons = True        # False: one row per image, its own radius in a column (randomized smoothing)
    columns = ()                # its certified.csv columns after image,label,epsilon,verdict,prediction,seconds
    verdicts = (ROBUST, NOT_ROBUST, UNKNOWN, MISCLASSIFIED)
    description = ""
    free_settings = ()          # settings that change no row (a resumed run may change them)

    @classmethod
    def add_arguments(cls, parser):
        """Add this certifier's own flags (their defaults must not clash with another certifier's)."""

    @classmethod
    def from_options(cls, **options):
        """Its Settings from keyword options named as its flags' destinations (norm, seed, alpha_iterations, ...;
        one it does not take is ignored, one not given is its flag's default); bad values raise UsageError."""
        return Settings()

    def __init__(self, model, settings, device="cpu", image_shape=None):
        """`model`: a utils.models.Classifier; `image_shape`: (3, H, W) of the images to come (None: the
        model's own size). Refuse a model it cannot certify here, with UsageError: before any output is written."""
        self.model, self.config, self.device, self.image_shape = model, settings, device, image_shape

    def recorded_settings(self):
        """What decides its rows: the method, the model (a digest of its weights) and the settings but
        `free_settings` (kept beside certified.csv, and --resume keeps earlier rows only when they match)."""
        settings = asdict(self.config) if is_dataclass(self.config) else {}
        return {"method": self.name, "model": weights_digest(self.model),
                **{key: value for key, value in settings.items() if key not in self.free_settings}}

    def certify(self, image_u8, label, epsilons):
        raise NotImplementedError
