"""Slack front end (slack-bolt): slash commands, thread uploads and reactions -> the core."""

from bot.slack.app import build_slack_app
from bot.slack.run import SlackBot, run_slack
from bot.slack.sender import SlackSender

__all__ = ["SlackBot", "SlackSender", "build_slack_app", "run_slack"]
