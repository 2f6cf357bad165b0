"""Converting new exams as they land in Drive: watch channels, the webhook, the changes feed, settling.

How an upload becomes one batch (GCP_FACTS §2 and gotchas 8 and 9):
1. `dicomflow watch add` opens a `changes.watch` channel and stores it with the feed's page token.
2. Drive POSTs a notification per change. The webhook checks channel id and token, ignores `sync`, and
   enqueues one *changes* task per channel per short window (same task id → created once), scheduled at
   the window's end, so a burst of notifications costs one read of the feed. It answers 200 at once.
3. The changes task reads `changes.list` from the stored token to the end, keeps files under the watched
   folder, and notes for each the *top folder* (the watched folder's child that holds it: a patient or
   study folder) with the time of its latest change. The new page token is saved only after the last page.
4. A folder quiet for the settle window (default 5 minutes) is submitted as one batch into the mirrored
   destination folder — a study uploading for 20 minutes becomes one batch, not hundreds. Fingerprints
   make a re-trigger cheap: series already converted are skipped.
Channels expire (a week at most); the daily renew replaces each before it does (new id, then stop the old).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from dicomflow.domain.failures import ConfigError, DicomflowError, Forbidden, InvalidInput, NotFound
from dicomflow.domain.layout import Layout
from dicomflow.domain.locations import Location, LocationKind, parse_location
from dicomflow.domain.series import ConversionOptions
from dicomflow.events import Event
from dicomflow.ports import Attempt, ChangeFeed, DriveChange, FileInfo, QueueName, Task, WatchChannel
from dicomflow.services.context import Context, event
from dicomflow.services.submit import BatchRequest, submit

MAX_DEPTH = 100  # Drive's folder nesting limit (GCP_FACTS §1)
_CHANNEL_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FOLDER = "application/vnd.google-apps.folder"


# --- watch channels ---------------------------------------------------------------------------------------


def add_watch(
    ctx: Context,
    folder: Location,
    destination: Location,
    options: ConversionOptions,
    label: str = "",
    *,
    owner: str = "",
    layout: Layout | None = None,
) -> WatchChannel:
    """Open a channel for `folder`; the batches it starts belong to `owner` (the caller of the batch API;
    "" for an operator's watch opened with direct access to the state store)."""
    if folder.kind is not LocationKind.DRIVE:
        raise InvalidInput("only Drive folders can be watched (drive://FOLDER_ID)", field="folder")
    settings = ctx.settings
    if not settings.webhook_url:
        raise ConfigError("watching needs DICOMFLOW_WEBHOOK_URL (the drive_webhook function's HTTPS URL)")
    ctx.source_for(folder).check(folder)
    ctx.sink_for(destination).check(destination)
    feed = ctx.changes()
    now = ctx.clock()
    channel = WatchChannel(
        channel_id=secrets.token_hex(16),
        resource_id="",
        folder_id=folder.ref,
        destination=destination.uri,
        page_token=feed.start_page_token(),
        expires_at=now + settings.channel_ttl_seconds,
        created_at=now,
        # The layout rides with the options (a mirror watch's options are stored as they always were).
        options=options.to_dict() | ({"layout": layout.to_dict()} if layout and layout.is_bids else {}),
        label=label,
        owner=owner,
    )
    return _open(ctx, feed, channel)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _open(ctx: Context, feed: ChangeFeed, channel: WatchChannel) -> WatchChannel:
    """Store the channel with the hash of a token of its own, then open it in Drive with that token
    (stored first: Drive's sync message can arrive before the watch response does)."""
    settings = ctx.settings
    token = secrets.token_urlsafe(32)  # Drive allows 256 characters (GCP_FACTS §1 'watch / channels')
    channel = replace(channel, token_hash=_token_hash(token), last_message=0)
    ctx.store.put_channel(channel)
    resource_id, expires_at = feed.watch(
        channel.channel_id,
        settings.webhook_url,
        token,
        channel.page_token,
        channel.expires_at,
    )
    opened, _ = ctx.store.update_channel(
        channel.channel_id, lambda c: replace(c, resource_id=resource_id, expires_at=expires_at or c.expires_at)
    )
    event(Event.CHANNEL_CREATED, "Drive watch channel opened", channel_id=channel.channel_id,
          expires_at=opened.expires_at)  # fmt: skip
    return opened


def remove_watch(ctx: Context, channel_id: str) -> WatchChannel:
    channel = ctx.store.get_channel(channel_id)
    if channel is None:
        raise NotFound(f"no watch channel {channel_id!r}")
    _stop(ctx, channel)
    return ctx.store.get_channel(channel_id) or channel


def _stop(ctx: Context, channel: WatchChannel) -> None:
    if channel.resource_id:
        try:
            ctx.changes().stop(channel.channel_id, channel.resource_id)
        except DicomflowError as exc:
            if not isinstance(exc, NotFound) and exc.code != "source_not_found":
                raise  # an expired or unknown channel is already stopped; anything else is a real error
    ctx.store.update_channel(channel.channel_id, lambda c: replace(c, active=False) if c.active else None)
    event(Event.CHANNEL_STOPPED, "Drive watch channel stopped", channel_id=channel.channel_id)


@dataclass(frozen=True, slots=True)
class RenewReport:
    renewed: int = 0
    failed: int = 0
    submitted: int = 0


def renew_channels(ctx: Context) -> RenewReport:
    """Replace channels that expire within the renewal margin: a new channel (new id) from the old one's
    page token, then stop the old one (an overlap of two live channels is expected and harmless)."""
    now = ctx.clock()
    renewed = failed = 0
    for old in ctx.store.list_channels():
        if old.expires_at - now > ctx.settings.channel_renew_before_seconds:
            continue
        fresh = replace(old, channel_id=secrets.token_hex(16), resource_id="", created_at=now,
                        expires_at=now + ctx.settings.channel_ttl_seconds)  # fmt: skip
        try:
            _open(ctx, ctx.changes(), fresh)
            _stop(ctx, old)
        except DicomflowError as exc:
            failed += 1
            ctx.store.update_channel(fresh.channel_id, lambda c: replace(c, active=False) if c.active else None)
            event(Event.CHANNEL_RENEWAL_FAILED, f"could not renew a Drive watch channel: {exc.reason}",
                  severity=logging.ERROR, channel_id=old.channel_id, expires_at=old.expires_at)  # fmt: skip
            continue
        renewed += 1
        event(Event.CHANNEL_RENEWED, "Drive watch channel renewed", channel_id=fresh.channel_id,
              replaced=old.channel_id)  # fmt: skip
    return RenewReport(renewed, failed, len(settle_folders(ctx)))


# --- the webhook ----------------------------------------------------------------------------------------------


def handle_webhook(ctx: Context, headers: Mapping[str, str]) -> int:
    """A Drive notification. Returns the HTTP status: 200 accepted (or ignored), 403 refused.

    Notifications carry no change data (GCP_FACTS §2); this only schedules a read of the feed. Nothing
    about the token is ever logged."""
    lowered = {k.lower(): v for k, v in headers.items()}  # header names are case-insensitive
    channel_id = lowered.get("x-goog-channel-id", "")
    token = lowered.get("x-goog-channel-token", "")
    state = lowered.get("x-goog-resource-state", "")
    resource = lowered.get("x-goog-resource-id", "")
    number = _message_number(lowered.get("x-goog-message-number", ""))
    if not _CHANNEL_ID.match(channel_id) or not resource or number is None:
        # Drive sends all three on every message (GCP_FACTS §2); anything else is not Drive.
        return _reject("channel id, resource id or message number missing", channel_id)
    channel = ctx.store.get_channel(channel_id)
    if channel is None or not channel.active:
        return _reject("unknown or stopped channel", channel_id)
    if not _token_matches(ctx, channel, token):
        return _reject("missing or wrong channel token", channel_id)
    if channel.resource_id and not hmac.compare_digest(resource.encode(), channel.resource_id.encode()):
        return _reject("resource does not match the channel", channel_id)
    # Message numbers grow per channel but not one by one (GCP_FACTS §2). A number not above the last one
    # accepted is a replay or arrived out of order: it changes nothing, because the read of the feed that
    # the later message scheduled covers every change made before it.
    _, fresh = ctx.store.update_channel(
        channel_id, lambda c: replace(c, last_message=number) if number > c.last_message else None
    )
    if not fresh:
        event(Event.WEBHOOK_REJECTED, "Drive notification ignored: replayed or out-of-order message number",
              severity=logging.INFO, channel_id=channel_id)  # fmt: skip
        return 200  # not a failure: Drive must not retry it
    if state == "sync":
        return 200  # sent once when a channel opens; nothing changed
    width = ctx.settings.webhook_window_seconds
    window = int(ctx.clock() // width)
    delay = (window + 1) * width - ctx.clock() + 1
    ctx.queue.enqueue(
        [Task(QueueName.CHANGES, f"changes-{channel_id}-{window}", {"channel_id": channel_id}, delay_seconds=delay)]
    )
    event(Event.WEBHOOK_ACCEPTED, "Drive notification accepted", severity=logging.DEBUG, channel_id=channel_id,
          state=state[:20])  # fmt: skip
    return 200


def _message_number(raw: str) -> int | None:
    text = raw.strip()
    if not text.isdigit() or len(text) > 20:
        return None
    return int(text)


def _token_matches(ctx: Context, channel: WatchChannel, token: str) -> bool:
    """The channel's own token (its hash is stored), in constant time; a channel opened before
    per-channel tokens is checked against the shared DICOMFLOW_WEBHOOK_TOKEN until it is renewed."""
    if channel.token_hash:
        return hmac.compare_digest(_token_hash(token).encode(), channel.token_hash.encode())
    shared = ctx.settings.webhook_token
    return bool(shared) and hmac.compare_digest(token.encode(), shared.encode())


def _reject(why: str, channel_id: str) -> int:
    event(Event.WEBHOOK_REJECTED, f"Drive notification refused: {why}", severity=logging.WARNING,
          channel_id=channel_id[:64] if _CHANNEL_ID.match(channel_id) else "(invalid)")  # fmt: skip
    return 403


# --- reading the feed and settling ---------------------------------------------------------------------------


def handle_changes_task(ctx: Context, payload: object, attempt: Attempt) -> None:
    if not isinstance(payload, dict):
        raise InvalidInput("task body must be a JSON object", field="body")
    if payload.get("settle") is True:
        settle_folders(ctx)
        return
    channel_id = payload.get("channel_id")
    if not isinstance(channel_id, str) or not _CHANNEL_ID.match(channel_id):
        raise InvalidInput("channel_id must be a channel id", field="channel_id")
    process_changes(ctx, channel_id)


def process_changes(ctx: Context, channel_id: str) -> int:
    """Read the feed from the channel's token to its end; note each touched top folder. Returns how
    many changes concerned the watched folder."""
    channel = ctx.store.get_channel(channel_id)
    if channel is None or not channel.active:
        return 0
    feed = ctx.changes()
    cache: dict[str, FileInfo] = {}
    token = channel.page_token
    relevant = 0
    while True:
        page = feed.changes(token)
        for change in page.changes:
            if change.removed or change.trashed:
                continue  # deletions and lost access convert nothing (GCP_FACTS gotcha 9)
            top = _top_folder(feed, cache, change, channel.folder_id)
            if top is not None:
                ctx.store.touch_pending_folder(top, channel.folder_id, ctx.clock())
                relevant += 1
        if page.next_page_token:
            token = page.next_page_token
            continue
        new_start = page.new_start_page_token or token
        break
    # Only now: a failure above re-reads from the old token, and touching a folder twice is harmless.
    ctx.store.update_channel(
        channel_id, lambda c: replace(c, page_token=new_start) if c.page_token != new_start else None
    )
    if relevant:
        # Look again once the settle window has passed (notifications may stop coming).
        width = ctx.settings.webhook_window_seconds
        window = int(ctx.clock() // width)
        ctx.queue.enqueue([Task(QueueName.CHANGES, f"settle-{window}", {"settle": True},
                                delay_seconds=ctx.settings.settle_seconds + width)])  # fmt: skip
    event(Event.CHANGES_PROCESSED, "Drive changes read", channel_id=channel_id, relevant=relevant)
    return relevant


def _top_folder(feed: ChangeFeed, cache: dict[str, FileInfo], change: DriveChange, watched: str) -> str | None:
    """The watched folder's child on the path to the changed file (or the watched folder itself for a
    file directly inside it); None when the file is elsewhere. Folder lookups are cached per read."""
    if change.file_id == watched:
        return None
    current, current_parents = change.file_id, change.parents
    for _ in range(MAX_DEPTH):
        if not current_parents:
            return None
        if watched in current_parents:
            return current if (current != change.file_id or change.mime_type == FOLDER) else watched
        parent = current_parents[0]
        if parent not in cache:
            cache[parent] = feed.file_info(parent)
        if cache[parent].trashed:
            return None
        current, current_parents = parent, cache[parent].parents
    return None


def settle_folders(ctx: Context) -> list[str]:
    """Submit every folder quiet for the settle window as one batch; returns the batch ids."""
    quiet_since = ctx.clock() - ctx.settings.settle_seconds
    watches = {c.folder_id: c for c in ctx.store.list_channels()}
    submitted: list[str] = []
    for folder in ctx.store.list_pending_folders(quiet_since):
        channel = watches.get(folder.watch_folder_id)
        if channel is None:
            continue  # the watch was removed meanwhile
        destination = parse_location(channel.destination, field="destination")
        source = Location(LocationKind.DRIVE, folder.folder_id)
        if channel.owner and not _still_granted(ctx, channel, source, destination):
            continue
        if folder.folder_id != folder.watch_folder_id:
            # Mirror the tree: DEST/<name of the top folder>/...
            name = ctx.changes().file_info(folder.folder_id).name
            destination = ctx.sink_for(destination).subfolder(destination, name)
        request = BatchRequest(
            sources=(source,),
            destination=destination,
            options=ConversionOptions.from_dict(channel.options),
            label=channel.label or "drive watch",
            layout=Layout.from_dict(channel.options.get("layout")),
        )
        key = f"settle-{folder.folder_id}-{folder.last_change_at:.3f}"
        batch = submit(ctx, request, idempotency_key=key, owner=channel.owner).batch
        if ctx.store.mark_folder_submitted(folder.folder_id, folder.last_change_at, batch.batch_id):
            submitted.append(batch.batch_id)
            event(Event.FOLDER_SETTLED, "a watched folder was quiet: batch submitted", batch_id=batch.batch_id)
    return submitted


def _still_granted(ctx: Context, channel: WatchChannel, source: Location, destination: Location) -> bool:
    """The owner's grants are checked again before each batch a watch starts: a revoked root stops the
    watch instead of converting into or out of a folder its owner may no longer use."""
    from dicomflow.services import access  # noqa: PLC0415 - access imports this module's neighbours

    try:
        caller = ctx.settings.access_policy.caller(channel.owner)
        access.check_locations(ctx, caller, [("folder", source), ("destination", destination)])
    except Forbidden:
        _stop(ctx, channel)
        event(Event.WEBHOOK_REJECTED, "a watch's owner is no longer granted its folders: watch stopped",
              severity=logging.WARNING, channel_id=channel.channel_id)  # fmt: skip
        return False
    return True


def channel_summary(channel: WatchChannel) -> dict[str, Any]:
    return {
        "channel_id": channel.channel_id,
        "folder": f"drive://{channel.folder_id}",
        "destination": channel.destination,
        "expires_at": channel.expires_at,
        "active": channel.active,
        "label": channel.label,
        "owner": channel.owner,
        "layout": Layout.from_dict(channel.options.get("layout")).summary(),
    }
