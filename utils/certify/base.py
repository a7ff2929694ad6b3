"""The interface every certifier of step 10 implements (a minimal version: step 10's registry holds the full one)."""


class Certifier:
    """One method of step 10: its name, the norms it certifies, whether it takes --epsilons, the columns it adds to
    certified.csv, its own command-line flags and the settings read from them."""
    name = ""
    norms = ()
    uses_epsilons = True
    columns = ()

    @classmethod
    def add_arguments(cls, parser):
        """Add this method's own flags to step 10's parser."""

    @classmethod
    def settings(cls, args):
        """This method's settings (a small frozen dataclass) from the parsed command line."""
        raise NotImplementedError

    def __init__(self, model, settings, device):
        self.model, self.settings, self.device = model, settings, device

    def certify(self, image_u8, label, epsilons):
        """Rows for certified.csv (dicts) for one 8-bit HxWx3 image, its label (a class index, or None) and the
        budgets."""
        raise NotImplementedError
