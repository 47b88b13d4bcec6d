"""The one exception type for mistakes a user can cause.

Library code raises `PipelineError` with a message that says what went wrong and what to do;
the CLI prints it as one line and exits 1, with no traceback.
"""


class PipelineError(Exception):
    """A user-fixable problem: missing file, bad parameter, mismatched cache, corrupt checkpoint."""
