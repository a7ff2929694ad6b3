"""The page's randomized-smoothing line (app.py): a certificate with a page's few samples, in words."""
import numpy as np

from utils.certify.smoothing import certify_image, largest_radius, levels_per_value
from utils.images import to_tensor

PAGE_SIGMA, PAGE_N0, PAGE_N, PAGE_ALPHA = 0.12, 20, 200, 0.001  # a page answers in seconds, not hours


def page_certificate(model, image_u8, adversarial_u8, sigma=PAGE_SIGMA, n0=PAGE_N0, n=PAGE_N, alpha=PAGE_ALPHA,
                     batch_size=50, seed=0):
    """One markdown line for the page: the smoothed model's certified L2 radius around the photo (n noisy copies, so a
    small n caps the radius) beside the L2 size of the attack's change. image_u8, adversarial_u8: 8-bit HxWx3."""
    found = certify_image(model, to_tensor(image_u8), sigma, n0, n, alpha, batch_size, seed)
    change = float(np.linalg.norm((adversarial_u8.astype(np.float64) - image_u8.astype(np.float64)) / 255))
    shape = image_u8.shape
    cap = largest_radius(n, alpha, sigma)
    head = (f"**Randomized smoothing** (sigma {sigma:g}, n = {n} noisy copies, alpha {alpha:g}; a small n for a page: "
            f"it cannot certify more than {cap:.2f}): ")
    attack = (f"the attack changed the photo by L2 {change:.2f} "
              f"({levels_per_value(change, shape):.2f} levels per value if spread evenly).")
    if found.abstain:
        return head + (f"the smoothed model abstains (its top class in {found.n_a} of {n} copies proves nothing); "
                       + attack)
    name = model.classes[found.candidate] if hasattr(model, "classes") else str(found.candidate)
    return head + (f"it says {name} for any change of L2 size below {found.radius:.3f} "
                   f"({levels_per_value(found.radius, shape):.3f} levels per value if spread evenly); ") + attack
