"""The tests' S3 buckets on the loopback S3 server (moto), with the AWS variables pointing there."""

from __future__ import annotations

import uuid

import pytest


def use_s3_bucket(endpoint: str, mp: pytest.MonkeyPatch, bucket: str | None = None) -> str:
    """Point the AWS variables (through ``mp``) at the loopback S3 server at ``endpoint`` and create
    ``bucket`` (default: a fresh name) there; its s3:// URI.

    The server has no roles: its keys follow the driver to Ray workers through the documented
    opt-in ``IMM_FORWARD_CREDENTIALS=1`` (imm_ray/ray_env.py)."""
    import boto3

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint, "IMM_FORWARD_CREDENTIALS": "1"}
    for key, value in env.items():
        mp.setenv(key, value)
    mp.delenv("AWS_SESSION_TOKEN", raising=False)
    bucket = bucket or f"imm-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"
