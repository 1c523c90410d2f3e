<?php
// An init error: a parse error.
return function ($event {
