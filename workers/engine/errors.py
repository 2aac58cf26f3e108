"""The one exception type the engine raises for problems a caller must report."""


class EngineError(Exception):
    """An audit cannot go on.

    ``permanent`` says whether retrying can help: a bad checkpoint or a probe of
    the wrong width is permanent (fail the audit with this message), a lost
    connection or a full disk is transient (the worker may retry).
    """

    def __init__(self, message: str, *, permanent: bool = True):
        super().__init__(message)
        self.message = message
        self.permanent = permanent


class AuditCancelled(Exception):
    """Raised from a progress callback to stop an audit between batches."""
