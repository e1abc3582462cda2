"""Helpers the tests share (servers, hostile files, checks); no tests here."""
