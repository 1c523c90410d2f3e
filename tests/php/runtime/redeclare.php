<?php
// An init error: a compile-time fatal error, not an exception.
function strlen($value)
{
    return 0;
}
return fn ($event) => $event;
