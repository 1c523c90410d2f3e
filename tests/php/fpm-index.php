<?php
// Served by php-fpm in the fpm layer's acceptance test.
header('Content-Type: text/plain');
header('X-Layer-Test: served');
echo 'method=', $_SERVER['REQUEST_METHOD'], "\n";
echo 'query=', $_GET['name'] ?? '', "\n";
echo 'body=', file_get_contents('php://input'), "\n";
echo 'sapi=', PHP_SAPI, "\n";
echo 'opcache=', function_exists('opcache_get_status') ? 'yes' : 'no', "\n";
