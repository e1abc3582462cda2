"""Helpers the tests share (servers, hostile files, checks), imported as `support.NAME`
(tests/ is on sys.path under pytest); no tests here."""
