"""The checks an upload passes before it is delivered, in the order they usually run.

    size      SizeLimit        too_large; the staged size is the announced one
    sniff     SniffType        type_not_allowed (magic bytes + declared type, allow/deny)
    checksum  VerifyChecksum   checksum_mismatch / checksum_invalid (client-declared digest)
    hook      CommandHook,     vetoed / hook_unavailable (outside program or service)
              HttpHook

Each is a :class:`Step`; :mod:`processing.config` builds the list from the settings.
"""

from processing.steps.base import Step, StepContext, StepProgress
from processing.steps.checksum import VerifyChecksum, parse_declared
from processing.steps.hook import CommandHook, HttpHook
from processing.steps.size import SizeLimit
from processing.steps.sniff import SniffType, TypePolicy, parse_patterns, sniff

__all__ = [
    "CommandHook",
    "HttpHook",
    "SizeLimit",
    "SniffType",
    "Step",
    "StepContext",
    "StepProgress",
    "TypePolicy",
    "VerifyChecksum",
    "parse_declared",
    "parse_patterns",
    "sniff",
]
