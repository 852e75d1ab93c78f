"""S3 access from the standard environment.

Credentials come from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or any other source
boto3 knows); the endpoint from ``S3_ENDPOINT_URL`` (read by mosaicml-streaming) or
``AWS_ENDPOINT_URL`` (read by boto3 and s3fs). :func:`sync_endpoint_env` copies whichever is set
to the other so every library talks to the same server. Nothing here ever logs a credential.
"""
from __future__ import annotations

import os


def is_remote(path: str) -> bool:
    return "://" in str(path)


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URL without a bucket: {url!r}")
    return bucket, key.strip("/")


# S3-compatible servers (Ceph RGW among them) refuse the streamed ("aws-chunked") uploads that the
# AWS SDKs now checksum by default: Arrow's S3 client, which Ray Train persists checkpoints with,
# failed against RGW with HTTP 411 MissingContentLength. With a custom endpoint, checksums are
# computed only where the API requires them, unless the user set these variables.
CHECKSUM_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
# What a process on another node needs to reach the same S3 server; no credential among them.
SHAREABLE_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", *CHECKSUM_ENV)


def sync_endpoint_env() -> str | None:
    """Make ``S3_ENDPOINT_URL`` and ``AWS_ENDPOINT_URL`` agree (and, for such a custom endpoint,
    default the checksum policy to ``when_required``); return the endpoint (or None: AWS)."""
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        os.environ.setdefault("S3_ENDPOINT_URL", endpoint)
        os.environ.setdefault("AWS_ENDPOINT_URL", endpoint)
        for name, value in CHECKSUM_ENV.items():
            os.environ.setdefault(name, value)
    return endpoint


def shareable_s3_env() -> dict[str, str]:
    """The endpoint, region and checksum settings of this environment (never a credential), for
    the environment of processes on other nodes."""
    sync_endpoint_env()
    return {k: os.environ[k] for k in SHAREABLE_ENV if k in os.environ}


def s3_filesystem():
    """An fsspec/s3fs filesystem for the environment's endpoint and credentials (no caching of
    listings, so shards written a moment ago are seen). fsspec keeps one instance per process
    and arguments, so a forked worker gets its own connections, never its parent's."""
    import s3fs
    endpoint = sync_endpoint_env()
    kwargs = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return s3fs.S3FileSystem(use_listings_cache=False, **kwargs)


def check_bucket(url: str) -> None:
    """Fail early, naming the bucket, when an ``s3://`` URL's bucket does not exist or cannot be read."""
    bucket, _ = split_s3_url(url)
    fs = s3_filesystem()
    try:
        ok = fs.exists(bucket)
    except PermissionError as e:
        raise PermissionError(f"S3 bucket {bucket!r} ({url}): access denied; check AWS_ACCESS_KEY_ID / "
                              f"AWS_SECRET_ACCESS_KEY and the endpoint {sync_endpoint_env() or '(AWS default)'}") from e
    if not ok:
        raise FileNotFoundError(f"S3 bucket {bucket!r} does not exist (from {url}; endpoint "
                                f"{sync_endpoint_env() or '(AWS default)'})")
