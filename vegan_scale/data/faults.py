"""What can be wrong with a shard, as the reader tells it apart (shared by every way of reading one)."""

from __future__ import annotations

from vegan_scale.errors import DataError


class ShardError(DataError):
    """A problem with one shard; ``reason`` is the counter it is filed under when bad data is skipped."""

    reason = "unreadable_shard"


class ShardMissing(ShardError):
    reason = "missing_shard"


class AccessDenied(ShardMissing):
    """A file the server refuses to send (HTTP 401/403, S3 AccessDenied): missing to a reader that skips bad shards
    (counted apart, so that a permission taken away shows as such), never "absent" to the fetch of a sizes.json or
    .idx, since a refusal hides whether the file exists."""

    reason = "refused_shard"

    @classmethod
    def of(cls, url: str, how: str) -> AccessDenied:
        """The refusal of ``url``, said as ``how`` (the server's status or code), with the two ways out."""
        return cls(
            f"{url} cannot be read {how}: grant read access, or upload the file if it is missing (a bucket that may "
            "not be listed refuses files that do not exist too; vegan-scale index-shards DIRECTORY writes sizes.json "
            "and the .idx files)"
        )


REFUSED_HTTP = (401, 403)
ABSENT_HTTP = (404, 410)  # the file is not there (a sizes.json or .idx may be; a shard must be)


class ShardCorrupt(ShardError):
    reason = "corrupt_shard"


CUT_SHORT = "it is shorter than its .idx says (cut short, or written again without its .idx); rewrite it"


class ShortShard(ShardError):
    """A shard that ends before the samples its sizes.json or .idx promise (cut short, a partial upload)."""

    reason = "short_shard"


class TransientReadError(Exception):
    """A read failure worth retrying (network, remote server, pipe command)."""
