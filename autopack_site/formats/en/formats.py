"""Date and time formats for English, used by the admin's lists and pages.

Django's own English format ("Dec. 6, 2026, 2:02 p.m.") stops at the minute; a phase can
start, fail and be retried within one, so times are shown to the second, ISO-ordered.
"""

from __future__ import annotations

DATETIME_FORMAT = "Y-m-d H:i:s T"
SHORT_DATETIME_FORMAT = "Y-m-d H:i:s"
TIME_FORMAT = "H:i:s"
