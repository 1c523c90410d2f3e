<?php
// An init error: the file returns no callable.
return 42;
