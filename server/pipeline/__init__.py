"""From a trained model to per-target artifacts: conversion, evaluation, gates, bundles."""
