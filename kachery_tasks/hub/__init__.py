"""kachery hub: the web app where channel owners sign in, create channels, admit nodes and grant
permissions (``kachery hub serve``). Every change is a new channel config signed with the channel's
key, which the hub holds, written to the channel's bucket; nodes obey it at their next refresh.
See docs/hub.md.

The web framework (FastAPI, Jinja2, authlib) is the ``[hub]`` extra: nothing here is imported by
the rest of the package except the command line's ``hub`` group and the hub join of
``kachery channel join``.
"""
