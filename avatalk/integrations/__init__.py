"""Ways to put an avatalk avatar in front of another voice agent (docs/integrations.md).

Each integration is an optional extra (``pip install 'avatalk[pipecat]'``) and
talks to an avatalk server over its public WebSocket protocol, in a render-only
session: nothing in here is imported by the server.
"""
