"""``discord.shard_count``: the bot runs on discord.py's shard manager when it is set."""

from __future__ import annotations

import pytest
from discord.ext import commands

from .bot_helpers import make_bot, outcome

SHARDS = 2


@pytest.fixture
def simcord_bot(database):
    """The bot of every SimCord test here: sharded."""
    return make_bot(database, discord={"shard_count": SHARDS})


@pytest.mark.parametrize(
    ("shard_count", "sharded", "connections"),
    [(None, False, None), ("auto", True, None), (1, True, 1), (16, True, 16)],
)
def test_create_bot_shards_only_when_configured(database, shard_count, sharded, connections):
    discord_section = {} if shard_count is None else {"shard_count": shard_count}
    bot = make_bot(database, discord=discord_section)
    assert isinstance(bot, commands.Bot)
    assert isinstance(bot, commands.AutoShardedBot) is sharded
    assert bot.shard_count == connections  # None: one connection, or Discord's count


@pytest.mark.simcord(settle_timeout=60)
async def test_a_sharded_bot_serves_a_server_on_its_second_shard(simcord_env):
    bot = simcord_env.bot
    assert sorted(bot.shards) == list(range(SHARDS))
    guild = simcord_env.create_guild("Far Away", shard_id=SHARDS - 1)
    assert bot.get_guild(guild.id).shard_id == SHARDS - 1
    channel = guild.create_text_channel("music")
    alice = guild.add_member(simcord_env.create_user("alice"))
    result = await alice.slash(channel, "music generate", prompt="drum loop", duration=1.0)
    message = outcome(result)
    assert message.content.startswith(f"<@{alice.id}>")
    assert any(a.filename.endswith(".mp3") for a in message.attachments)
