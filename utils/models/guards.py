"""How every model load is guarded: tensors only, never code (`weights_only_loads`); libraries' warnings and download
announcements kept off the user's screen (`warnings_silenced`, `announced_on_success`), so that a failure is one line
(`first_line`) that says whether the network is there at all (`no_network`)."""
import contextlib
import io
import os
import socket
import sys
import warnings


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside reads tensors only, even where a library asks for weights_only=False
    (torch.export.load, timm's .bin fallback): a model file or a download is data, never code to run."""
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


@contextlib.contextmanager
def warnings_silenced():
    """Libraries' warnings about themselves (torch.jit is deprecated, robustbench imports pkg_resources) are not the
    user's business: on stderr, a failure is one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def announced_on_success():
    """Libraries announce a download on stdout even when it then fails (torch.hub, gdown, timm): the announcement goes
    to stderr for a load that works, and a failure stays one line."""
    with contextlib.redirect_stdout(io.StringIO()) as messages:
        yield
    sys.stderr.write(messages.getvalue())


def no_network(host):
    """"no network: HOST does not resolve", or None when it resolves."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"no network: {host} does not resolve"
    return None


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

