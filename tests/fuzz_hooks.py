"""Schemathesis hooks for tests/test_api_fuzz.py (loaded through SCHEMATHESIS_HOOKS)."""
import schemathesis


@schemathesis.check
def no_traceback(ctx, response, case):
    content_type = " ".join(response.headers.get("content-type") or response.headers.get("Content-Type") or [])
    if "zip" in content_type:
        return  # a backup is binary; nothing to read
    body = response.content.decode("utf-8", "replace")
    if "Traceback" in body or 'File "' in body:
        raise AssertionError(f"a traceback leaked into the response: {body[:300]}")


@schemathesis.hook
def before_call(ctx, case, kwargs):
    """A followed log never ends: fuzz the log endpoint's other answers, not its stream (tested on its own)."""
    if case.operation.path == "/api/instances/{id}/logs" and isinstance(case.query, dict) \
            and str(case.query.get("follow", "")).lower() in ("1", "true", "yes"):
        case.query["follow"] = "0"
