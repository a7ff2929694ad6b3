"""The project's one exception for bad input. It imports nothing of the project's, so that any module (utils.cli,
utils.speed, ...) can raise it without importing another."""


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2, no traceback.

    The library is called from Python as well as from the command line, so a message about one of its parameters
    names the parameter, not a flag: it lists the names it speaks of after the message and writes each in backquotes,
    UsageError("`norm` 'L3': choose from Linf, L2, L1", "norm"). str() writes them as they are ("norm 'L3': ...");
    a command line writes each as the flag that sets it ("--norm 'L3': ...", utils.cli.run), so the one message
    serves both without the library knowing its flags."""

    def __init__(self, message, *parameters):
        super().__init__(message, *parameters)  # all in args: a copy pickled to another process keeps them

    @property
    def parameters(self):
        return self.args[1:]

    def describe(self, spell=str):
        """The message with each parameter written as `spell` gives it (its name by default)."""
        text = self.args[0]
        for parameter in self.parameters:
            text = text.replace(f"`{parameter}`", spell(parameter))
        return text

    def __str__(self):
        return self.describe()
