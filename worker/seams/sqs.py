"""The SQS seam: receive and delete event messages; the only place that catches botocore errors for SQS."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from worker.errors import ConfigError, TransientError

_CONFIG_CODES = {"AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "SignatureDoesNotMatch",
                 "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "UnrecognizedClientException"}


@dataclass(frozen=True)
class Message:
    """One received message: its body, the handle that deletes it, and how often it was received."""

    message_id: str
    body: str
    receipt: str = field(repr=False)
    receive_count: int = 1


class EventQueue:
    """One SQS queue, by URL or by name (then looked up once)."""

    def __init__(self, queue: str, *, endpoint_url: str | None, region: str) -> None:
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=40)
        with _translate(queue):
            self._sqs = boto3.session.Session().client("sqs", endpoint_url=endpoint_url, region_name=region,
                                                       config=config)
            self.url = queue if urlsplit(queue).scheme in ("http", "https") else \
                self._sqs.get_queue_url(QueueName=queue)["QueueUrl"]

    def receive(self, *, wait_s: int, max_messages: int = 10) -> list[Message]:
        """Long-poll for up to max_messages (SQS's most is 10)."""
        with _translate(self.url):
            answer = self._sqs.receive_message(QueueUrl=self.url, MaxNumberOfMessages=max_messages,
                                               WaitTimeSeconds=wait_s, AttributeNames=["ApproximateReceiveCount"])
        return [Message(m["MessageId"], m.get("Body", ""), m["ReceiptHandle"],
                        int(m.get("Attributes", {}).get("ApproximateReceiveCount", "1")))
                for m in answer.get("Messages", ())]

    def delete(self, messages: list[Message]) -> int:
        """Delete handled messages (in batches of 10); returns how many SQS refused (they come back later)."""
        refused = 0
        for start in range(0, len(messages), 10):
            batch = messages[start:start + 10]
            with _translate(self.url):
                answer = self._sqs.delete_message_batch(QueueUrl=self.url, Entries=[
                    {"Id": str(i), "ReceiptHandle": m.receipt} for i, m in enumerate(batch)])
            refused += len(answer.get("Failed", ()))
        return refused


@contextmanager
def _translate(where: str) -> Iterator[None]:
    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _CONFIG_CODES or status in (401, 403):
            raise ConfigError(f"SQS {where}: refused ({code}); check the queue, IRLIVE_SQS_ENDPOINT_URL and "
                              "the credentials") from None
        raise TransientError(f"SQS {where}: answered {code} ({status})") from None
    except NoCredentialsError:
        raise ConfigError("no AWS credentials for SQS: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a "
                          "profile") from None
    except EndpointConnectionError:
        raise TransientError(f"SQS {where}: endpoint unreachable (IRLIVE_SQS_ENDPOINT_URL)") from None
    except BotoCoreError as exc:
        raise TransientError(f"SQS {where}: client error {type(exc).__name__}") from None
