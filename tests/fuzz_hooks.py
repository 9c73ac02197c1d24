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
