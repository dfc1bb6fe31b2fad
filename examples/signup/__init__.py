"""The user-signup story: user-service creates users, three services react.

::

    CreateUser ─▶ user-service ─▶ UserCreated ─┬─▶ email-service ─▶ EmailSent
                                               ├─▶ analytics-service
                                               └─▶ notification-service
"""
