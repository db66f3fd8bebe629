"""The sink interface on an S3 bucket and key prefix."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class S3Sink:
    """An S3 bucket and key prefix, given as `s3://bucket/prefix`."""

    def __init__(self, client: S3Client, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"S3 sink must look like s3://bucket/prefix, not {url!r}")
        self._s3 = client
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.location = url

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, blob: bytes, content_type: str) -> str:
        self._s3.put_object(
            Bucket=self.bucket, Key=self._full(key), Body=blob, ContentType=content_type
        )
        return f"s3://{self.bucket}/{self._full(key)}"

    def get(self, key: str) -> bytes | None:
        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
        except self._s3.exceptions.NoSuchKey:
            return None

    def keys(self, prefix: str) -> Iterator[str]:
        strip = len(self._full(""))
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._full(prefix)
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:]
