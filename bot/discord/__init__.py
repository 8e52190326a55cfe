"""Discord front end (discord.py 2.x): slash commands, thread images, reactions, outbox sender.

Entry points: `bot.discord.run.run_discord` and `bot.discord.run.print_invite_url`.
"""
