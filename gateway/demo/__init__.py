"""The demo: simulated PACS and RIS peers (pynetdicom), reusable as test peers."""
